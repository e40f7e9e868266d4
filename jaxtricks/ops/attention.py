"""Scaled dot-product attention with grouped key/value heads, and the KV-cache size it implies.

softmax(q k^T / sqrt(H) + mask) v (Vaswani et al. 2017, arXiv 1706.03762) for N query heads and K
key/value heads: MHA K = N, GQA 1 < K < N (Ainslie et al. 2023, arXiv 2305.13245), MQA K = 1
(Shazeer 2019, arXiv 1911.02150). Queries are reshaped to (B, T, K, G = N/K, H) so every group
reads its K/V head without repeating it. Cross-Layer Attention (Brandon et al. 2024, arXiv
2405.12981) shares K/V between layers; KV bytes per token = 2 K H (number of K/V-producing layers)
(bytes per element). Shape contracts are chex assertions on static shapes, checked at trace time.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks.ops.blockwise_attention import blockwise_attention
from jaxtricks.ops.hyper_attention import hyper_attention
from jaxtricks.ops.kv_layout import kv_sources
from jaxtricks.ops.ring_attention import context_parallel_size, ring_attention

__all__ = ["attention", "cached_attention", "causal_mask", "check_implementation",
           "kv_bytes_per_token", "kv_sources"]

_NEG_INF = -1e30
IMPLEMENTATIONS = ("naive", "xla", "cudnn", "ring", "blockwise", "hyper")


def check_implementation(implementation: str) -> None:
  """The one check of an implementation name (configs call it too)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; valid: "
                     f"{', '.join(IMPLEMENTATIONS)}")


def visible(diff, window: int = 0, strict: bool = False):
  """Whether a key `diff` = query position - key position before the query is visible: diff >= 0
  (> 0 when strict) and diff < window when window > 0. numpy or jnp arrays alike."""
  mask = diff > 0 if strict else diff >= 0
  return mask & (diff < window) if window else mask


def causal_mask(q_pos_BxT: jnp.ndarray, k_pos_BxS: jnp.ndarray, window: int = 0,
                strict: bool = False) -> jnp.ndarray:
  """(B, T, S) boolean: query at position p may attend keys at positions <= p (< p when
  strict), and > p - window when window > 0."""
  chex.assert_rank([q_pos_BxT, k_pos_BxS], 2, custom_message="causal_mask: positions")
  chex.assert_equal_shape([q_pos_BxT, k_pos_BxS], dims=0, custom_message="causal_mask: batch")
  return visible(q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :], window, strict)


def static_mask(t: int, window: int = 0, strict: bool = False) -> np.ndarray:
  """(1, T, T) `causal_mask` of positions 0..T-1, a numpy constant."""
  return visible(np.arange(t)[:, None] - np.arange(t)[None, :], window, strict)[None]


def attention(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray, v_BxSxKxH: jnp.ndarray,
              mask_BxTxS: jnp.ndarray | None = None, implementation: str = "naive",
              causal: bool = False, window: int = 0, strict: bool = False,
              options: dict | None = None) -> jnp.ndarray:
  """Attention output (B, T, N, H); logits and softmax in float32.

  implementation: 'naive' (two einsums, any backend), or 'xla' / 'cudnn', which call
  jax.nn.dot_product_attention ('cudnn' needs an NVIDIA GPU and float16/bfloat16 inputs), or
  'ring': causal attention with the sequence split over the current mesh's 'context' axis
  (ops.ring_attention); 'naive' where there is no such axis or a mask is given. 'blockwise':
  exact attention by online softmax over key blocks (ops.blockwise_attention); 'hyper':
  HyperAttention's approximation of plain causal attention (ops.hyper_attention); both take
  their settings from `options` (keyword arguments of those functions) and are 'naive' when a
  mask is given (cached decoding).
  causal: queries and keys are both at positions 0..T-1 (a static mask, or the backend's causal
  kernel); combined with `mask_BxTxS` when both are given. window, strict: `causal_mask`'s, for
  causal attention.
  """
  _check_qkv("attention", q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, "BSKH")
  b, t, n, h = q_BxTxNxH.shape
  s = k_BxSxKxH.shape[1]
  if causal and s != t:
    raise ValueError(f"causal attention needs as many keys as queries, got {s} and {t}")
  if (window or strict) and not causal:
    raise ValueError("a sliding window or a masked diagonal needs causal attention")
  check_implementation(implementation)
  plain = mask_BxTxS is None and not strict
  if implementation == "ring":
    if causal and plain and not window and context_parallel_size() > 1:
      return ring_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
    implementation = "naive"
  options = options or {}
  if implementation == "blockwise" and mask_BxTxS is None:
    return blockwise_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, causal=causal, window=window,
                               strict=strict, **options)
  if implementation == "hyper" and mask_BxTxS is None:
    if window or strict or not causal:
      raise ValueError("HyperAttention here approximates plain causal attention (no sliding "
                       "window, no masked diagonal)")
    return hyper_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, **options)
  if implementation in ("xla", "cudnn") and not strict:
    mask = None if mask_BxTxS is None else mask_BxTxS[:, None]
    local = (window - 1, 0) if window else None
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask,
                                        is_causal=causal, local_window_size=local,
                                        implementation=implementation)
  if causal:
    static_1xTxS = static_mask(t, window, strict)
    mask_BxTxS = static_1xTxS if mask_BxTxS is None else mask_BxTxS & static_1xTxS
  return _grouped(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, "BSKH", zero_empty=strict)


def cached_attention(q_BxTxNxH: jnp.ndarray, k_BxKxSxH: jnp.ndarray, v_BxKxSxH: jnp.ndarray,
                     mask_BxTxS: jnp.ndarray | None, zero_empty: bool = False) -> jnp.ndarray:
  """`attention` against a head-major KV cache (B, K, S, H), the decoding layout.

  With (B, K) leading, both products are plain batched matmuls over the cache as it lies; a
  (B, S, K, H) cache would be transposed whole at every decoding step.
  """
  _check_qkv("cached_attention", q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, "BKSH")
  return _grouped(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, "BKSH", zero_empty)


def _check_qkv(name: str, q_BxTxNxH, k, v, mask_BxTxS, kv: str) -> None:
  """The shape contract of both layouts: q (B, T, N, H), k and v equal (B, S, K, H) or
  (B, K, S, H), N a multiple of K, mask (B or 1, T, S)."""
  chex.assert_rank([q_BxTxNxH, k, v], 4, custom_message=f"{name}: q, k, v")
  chex.assert_equal_shape([k, v], custom_message=f"{name}: k and v")
  chex.assert_equal_shape([q_BxTxNxH, k], dims=(0, 3), custom_message=f"{name}: batch, head dim")
  b, t, n, _ = q_BxTxNxH.shape
  n_kv, s = k.shape[kv.index("K")], k.shape[kv.index("S")]
  if n % n_kv:
    raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({n_kv})")
  if mask_BxTxS is not None:
    chex.assert_shape(mask_BxTxS, ({1, b}, t, s), custom_message=f"{name}: mask_BxTxS")


def _grouped(q_BxTxNxH, k, v, mask_BxTxS, kv: str, zero_empty: bool = False) -> jnp.ndarray:
  """Queries grouped as (B, T, K, G, H) against K/V in layout `kv` (BSKH or BKSH). For the
  head-major cache the queries are put head-major too: XLA then runs both products without
  relayouts (faster per decoding step on CPU than letting it choose; benchmarks.attention).
  zero_empty: queries whose mask row is all False output zeros (else the mean of v)."""
  b, t, n, h = q_BxTxNxH.shape
  n_kv = k.shape[kv.index("K")]
  q = q_BxTxNxH.reshape(b, t, n_kv, n // n_kv, h)
  qs = "BKGTH" if kv == "BKSH" else "BTKGH"
  if qs == "BKGTH":
    q = q.transpose(0, 2, 3, 1, 4)
  logits_BxKxGxTxS = jnp.einsum(f"{qs},{kv}->BKGTS", q, k,
                                preferred_element_type=jnp.float32) * (h ** -0.5)
  if mask_BxTxS is not None:
    logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, _NEG_INF)
  # Softmax normalised after the value product: T x H divisions instead of T x S.
  max_BxKxGxTx1 = jax.lax.stop_gradient(jnp.max(logits_BxKxGxTxS, axis=-1, keepdims=True))
  unnorm_BxKxGxTxS = jnp.exp(logits_BxKxGxTxS - max_BxKxGxTx1)
  den_BxKxGxT = jnp.sum(unnorm_BxKxGxTxS, axis=-1)
  out = jnp.einsum(f"BKGTS,{kv}->{qs}", unnorm_BxKxGxTxS.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  den = den_BxKxGxT.transpose(0, 3, 1, 2) if qs == "BTKGH" else den_BxKxGxT
  out = (out / den[..., None]).astype(v.dtype)
  if qs == "BKGTH":
    out = out.transpose(0, 3, 1, 2, 4)
  out = out.reshape(b, t, n, h)
  if zero_empty and mask_BxTxS is not None:
    out = jnp.where(jnp.any(mask_BxTxS, axis=-1)[..., None, None], out, 0).astype(out.dtype)
  return out


def kv_bytes_per_token(config, bytes_per_element: int | None = None) -> int:
  """KV-cache bytes per token: 2 (K and V) * kv heads * head dim * producing layers * bytes.

  Producers with a sliding window are not counted: their cache is a fixed-size ring buffer, the
  same for every context length. `config` is a ModelConfig (duck-typed: attention.kv_heads,
  dim_per_head, kv_plan, dtype).
  """
  if bytes_per_element is None:
    bytes_per_element = jnp.dtype(config.dtype).itemsize
  heads = config.attention.kv_heads
  global_producers = [s for s in config.kv_plan if s.produces and not s.window]
  return 2 * heads * config.dim_per_head * len(global_producers) * bytes_per_element

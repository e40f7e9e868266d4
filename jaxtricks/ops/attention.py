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

from jaxtricks.ops.ring_attention import context_parallel_size, ring_attention

_NEG_INF = -1e30
IMPLEMENTATIONS = ("naive", "xla", "cudnn", "ring")


def check_implementation(implementation: str) -> None:
  """The one check of an implementation name (configs call it too)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; valid: "
                     f"{', '.join(IMPLEMENTATIONS)}")


def causal_mask(q_pos_BxT: jnp.ndarray, k_pos_BxS: jnp.ndarray) -> jnp.ndarray:
  """(B, T, S) boolean: query at position p may attend keys at positions <= p."""
  chex.assert_rank([q_pos_BxT, k_pos_BxS], 2, custom_message="causal_mask: positions")
  chex.assert_equal_shape([q_pos_BxT, k_pos_BxS], dims=0, custom_message="causal_mask: batch")
  return q_pos_BxT[:, :, None] >= k_pos_BxS[:, None, :]


def attention(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray, v_BxSxKxH: jnp.ndarray,
              mask_BxTxS: jnp.ndarray | None = None, implementation: str = "naive",
              causal: bool = False) -> jnp.ndarray:
  """Attention output (B, T, N, H); logits and softmax in float32.

  implementation: 'naive' (two einsums, any backend), or 'xla' / 'cudnn', which call
  jax.nn.dot_product_attention ('cudnn' needs an NVIDIA GPU and float16/bfloat16 inputs), or
  'ring': causal attention with the sequence split over the current mesh's 'context' axis
  (ops.ring_attention); 'naive' where there is no such axis or a mask is given.
  causal: queries and keys are both at positions 0..T-1 (a static mask, or the backend's causal
  kernel); combined with `mask_BxTxS` when both are given.
  """
  _check_qkv("attention", q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, "BSKH")
  b, t, n, h = q_BxTxNxH.shape
  s = k_BxSxKxH.shape[1]
  if causal and s != t:
    raise ValueError(f"causal attention needs as many keys as queries, got {s} and {t}")
  check_implementation(implementation)
  if implementation == "ring":
    if causal and mask_BxTxS is None and context_parallel_size() > 1:
      return ring_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
    implementation = "naive"
  if implementation in ("xla", "cudnn"):
    mask = None if mask_BxTxS is None else mask_BxTxS[:, None]
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask,
                                        is_causal=causal, implementation=implementation)
  if causal:
    tril_1xTxS = np.tril(np.ones((1, t, s), bool))
    mask_BxTxS = tril_1xTxS if mask_BxTxS is None else mask_BxTxS & tril_1xTxS
  return _grouped(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, "BSKH")


def cached_attention(q_BxTxNxH: jnp.ndarray, k_BxKxSxH: jnp.ndarray, v_BxKxSxH: jnp.ndarray,
                     mask_BxTxS: jnp.ndarray | None) -> jnp.ndarray:
  """`attention` against a head-major KV cache (B, K, S, H), the decoding layout.

  With (B, K) leading, both products are plain batched matmuls over the cache as it lies; a
  (B, S, K, H) cache would be transposed whole at every decoding step.
  """
  _check_qkv("cached_attention", q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, "BKSH")
  return _grouped(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, "BKSH")


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


def _grouped(q_BxTxNxH, k, v, mask_BxTxS, kv: str) -> jnp.ndarray:
  """Queries grouped as (B, T, K, G, H) against K/V in layout `kv` (BSKH or BKSH). For the
  head-major cache the queries are put head-major too: XLA then runs both products without
  relayouts (faster per decoding step on CPU than letting it choose; benchmarks.attention)."""
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
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"BKGTS,{kv}->{qs}", probs, v)
  if qs == "BKGTH":
    out = out.transpose(0, 3, 1, 2, 4)
  return out.reshape(b, t, n, h)


def kv_sources(n_layers: int, sharing: int = 1, layout: tuple[int, ...] = ()) -> tuple[int, ...]:
  """Layer i reads the K/V produced by layer kv_sources[i] (a producer has kv_sources[i] == i).

  An explicit `layout` wins (KeepEnds, DenseFront, DenseBack, ...). Otherwise sharing factor s
  (CLA-s): groups of s consecutive layers share the first one's K/V; when s does not divide the
  depth, the first group is the short one (20 layers, CLA3: 7 producers, as in the CLA paper).
  """
  if layout:
    if len(layout) != n_layers:
      raise ValueError(f"kv layout has {len(layout)} entries for {n_layers} layers")
    for i, src in enumerate(layout):
      if not 0 <= src <= i or layout[src] != src:
        raise ValueError(f"kv layout {layout}: layer {i} must read a producing layer at or "
                         f"before it (got {src})")
    return tuple(layout)
  if not 1 <= sharing <= n_layers:
    raise ValueError(f"CLA sharing factor {sharing} must be between 1 and the depth {n_layers}")
  first = n_layers % sharing or sharing
  return tuple(0 if i < first else first + (i - first) // sharing * sharing
               for i in range(n_layers))


def kv_bytes_per_token(config, bytes_per_element: int | None = None) -> int:
  """KV-cache bytes per token: 2 (K and V) * kv heads * head dim * producing layers * bytes.

  `config` is a ModelConfig (duck-typed: attention.kv_heads, dim_per_head, kv_producers, dtype).
  """
  if bytes_per_element is None:
    bytes_per_element = jnp.dtype(config.dtype).itemsize
  heads = config.attention.kv_heads
  return 2 * heads * config.dim_per_head * len(config.kv_producers) * bytes_per_element

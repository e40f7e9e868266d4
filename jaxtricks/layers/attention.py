"""Self-attention with RoPE, grouped K/V heads, cross-layer K/V sharing and a KV cache
(arXiv 1706.03762, 2104.09864, 2305.13245, 1911.02150, 2405.12981).

A layer either produces K/V (it has K/V projections) or reuses the K/V of an earlier layer passed
in as `shared_kv` (Cross-Layer Attention: no K/V projections at all). With a cache, new keys
(after RoPE) and values are written at each row's current length and attention reads the cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.layers.linear import Linear
from jaxtricks.ops.attention import attention, causal_mask
from jaxtricks.ops.rope import apply_rope

# (keys (B, S, K, H), values (B, S, K, H), key positions (B, S) or None for 0..S-1)
KV = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]


def write_cache(cache_BxSxKxH: jnp.ndarray, new_BxTxKxH: jnp.ndarray,
                lengths_B: jnp.ndarray) -> jnp.ndarray:
  """Writes each row's new entries at that row's current length."""
  update = lambda c, x, i: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (i, 0, 0))
  return jax.vmap(update)(cache_BxSxKxH, new_BxTxKxH, lengths_B)


class SelfAttention(nn.Module):
  n_heads: int
  n_kv_heads: int
  head_dim: int
  produces_kv: bool = True
  n_layers: int = 1
  rope_base: float = 10_000.0
  implementation: str = "naive"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, xq_BxTxD: jnp.ndarray, xkv_BxTxD: jnp.ndarray,
               positions_BxT: jnp.ndarray | None, shared_kv: KV | None = None,
               cache: dict | None = None) -> tuple[jnp.ndarray, KV, dict | None]:
    """Returns (output (B, T, D), the K/V this layer attended to, its updated cache or None).

    positions None means every row is at 0..T-1 (training): static RoPE tables and causal mask.
    """
    if cache is not None and positions_BxT is None:
      raise ValueError("decoding with a cache needs the positions of the new tokens")
    d = xq_BxTxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, k, h = self.n_heads, self.n_kv_heads, self.head_dim
    q_BxTxNxH = Linear((n, h), ("embed", "heads", "head_dim"), std=d ** -0.5, name="q",
                       **kw)(xq_BxTxD)
    q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, self.rope_base)
    if self.produces_kv:
      k_BxTxKxH = Linear((k, h), ("embed", "kv_heads", "head_dim"), std=d ** -0.5, name="k",
                         **kw)(xkv_BxTxD)
      v_BxTxKxH = Linear((k, h), ("embed", "kv_heads", "head_dim"), std=d ** -0.5, name="v",
                         **kw)(xkv_BxTxD)
      k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, self.rope_base)
      if cache is None:
        kv = (k_BxTxKxH, v_BxTxKxH, positions_BxT)
      else:
        lengths_B = positions_BxT[:, 0]
        cache = {"k": write_cache(cache["k"], k_BxTxKxH, lengths_B),
                 "v": write_cache(cache["v"], v_BxTxKxH, lengths_B)}
        slots_BxS = jnp.broadcast_to(jnp.arange(cache["k"].shape[1]), cache["k"].shape[:2])
        kv = (cache["k"], cache["v"], slots_BxS)
    else:
      if shared_kv is None:
        raise ValueError("a layer without K/V projections needs the K/V of an earlier layer")
      kv = shared_kv
    k_BxSxKxH, v_BxSxKxH, k_pos_BxS = kv
    static = positions_BxT is None and k_pos_BxS is None
    if not static and (positions_BxT is None or k_pos_BxS is None):
      raise ValueError("queries and shared keys must both have positions or both be 0..T-1")
    mask_BxTxS = None if static else causal_mask(positions_BxT, k_pos_BxS)
    out_BxTxNxH = attention(q_BxTxNxH, k_BxSxKxH.astype(q_BxTxNxH.dtype),
                            v_BxSxKxH.astype(q_BxTxNxH.dtype), mask_BxTxS, self.implementation,
                            causal=static)
    std = (n * h * 2 * self.n_layers) ** -0.5
    out_BxTxD = Linear((d,), ("heads", "head_dim", "embed"), in_ndim=2, std=std, name="o",
                       **kw)(out_BxTxNxH)
    return out_BxTxD, kv, cache

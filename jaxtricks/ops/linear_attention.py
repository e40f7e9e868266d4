"""Causal simplified linear attention: SLAB's ReLU-kernel attention plus a depthwise convolution
on V (Guo et al. 2024, arXiv 2405.11582, eq. 6-7), made causal for language models.

With features phi = ReLU, query t reads every key j <= t through a running state per K/V head:
  S_t = sum_{j<=t} phi(k_j)^T v_j   (H x Hv),   z_t = sum_{j<=t} phi(k_j)   (H),
  o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps) + DWC(v)_t,
DWC a causal depthwise convolution over the last `width` values of v (per channel, the weights
shared across heads, as SLAB shares them). A sequence is computed chunk by chunk (the chunkwise
form of a prefix sum): inside a chunk of C tokens the quadratic masked form, across chunks the
exclusive prefix sum of the chunks' states, so memory is O(T H + T/C H^2) instead of the
O(T H^2) of a per-token cumulative sum. Decoding carries (S, z) and the last width - 1 values:
a state whose size does not depend on the context length. Grouped query heads read their K/V
head's state without repeating it. Features and sums are float32.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = ["causal_conv", "causal_linear_attention", "conv_history"]


def causal_linear_attention(q_BxTxNxH: jnp.ndarray, k_BxTxKxH: jnp.ndarray,
                            v_BxTxKxH: jnp.ndarray,
                            state: tuple[jnp.ndarray, jnp.ndarray] | None = None,
                            valid_BxT: jnp.ndarray | None = None, chunk: int = 64,
                            eps: float = 1e-6
                            ) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
  """(o (B, T, N, H) in q's dtype, final state (S (B, K, H, H), z (B, K, H)) in float32).

  state: the (S, z) of the tokens before these (None: zeros); valid_BxT: keys that enter the
  state (False: right padding of a prefill; their queries still get an output).
  """
  chex.assert_rank([q_BxTxNxH, k_BxTxKxH, v_BxTxKxH], 4)
  chex.assert_equal_shape([k_BxTxKxH, v_BxTxKxH])
  chex.assert_equal_shape([q_BxTxNxH, k_BxTxKxH], dims=(0, 1, 3))
  b, t, n, h = q_BxTxNxH.shape
  kh = k_BxTxKxH.shape[2]
  if n % kh:
    raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kh})")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  f32, dtype = jnp.float32, q_BxTxNxH.dtype
  q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (x.astype(f32) for x in (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH))
  phi_k = jax.nn.relu(k_BxTxKxH)
  if valid_BxT is not None:
    phi_k = jnp.where(valid_BxT[:, :, None, None], phi_k, 0.0)
  c = min(chunk, t)
  m = -(-t // c)
  pad = m * c - t  # zero keys have zero features: they add nothing to any state
  pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])  # noqa: E731
  phi_q = jax.nn.relu(pad_t(q_BxTxNxH)).reshape(b, m, c, kh, n // kh, h)
  phi_k = pad_t(phi_k).reshape(b, m, c, kh, h)
  v = pad_t(v_BxTxKxH).reshape(b, m, c, kh, h)
  if state is None:
    s0_BxKxHxH, z0_BxKxH = jnp.zeros((b, kh, h, h), f32), jnp.zeros((b, kh, h), f32)
  else:
    s0_BxKxHxH, z0_BxKxH = (x.astype(f32) for x in state)
    chex.assert_shape([s0_BxKxHxH, z0_BxKxH], [(b, kh, h, h), (b, kh, h)])

  scores = jnp.einsum("bmckgh,bmdkh->bmkgcd", phi_q, phi_k)
  scores = jnp.where(jnp.tril(jnp.ones((c, c), bool)), scores, 0.0)
  num = jnp.einsum("bmkgcd,bmdkv->bmckgv", scores, v)
  den = jnp.einsum("bmkgcd->bmckg", scores)
  ds_BxMxKxHxH = jnp.einsum("bmckh,bmckv->bmkhv", phi_k, v)
  dz_BxMxKxH = jnp.sum(phi_k, axis=2)
  s_prev = jnp.cumsum(ds_BxMxKxHxH, axis=1) - ds_BxMxKxHxH + s0_BxKxHxH[:, None]
  z_prev = jnp.cumsum(dz_BxMxKxH, axis=1) - dz_BxMxKxH + z0_BxKxH[:, None]
  num = num + jnp.einsum("bmckgh,bmkhv->bmckgv", phi_q, s_prev)
  den = den + jnp.einsum("bmckgh,bmkh->bmckg", phi_q, z_prev)
  o = (num / (den + eps)[..., None]).reshape(b, m * c, n, h)[:, :t]
  final = (s_prev[:, -1] + ds_BxMxKxHxH[:, -1], z_prev[:, -1] + dz_BxMxKxH[:, -1])
  return o.astype(dtype), final


def causal_conv(v_BxTxKxH: jnp.ndarray, w_WxH: jnp.ndarray,
                history_BxPxKxH: jnp.ndarray | None = None) -> jnp.ndarray:
  """Depthwise causal convolution over time: out_t = sum_i w[i] v_(t-i), channels H, the same
  weights for every head; `history` the W - 1 values before these (None: zeros)."""
  w = w_WxH.shape[0]
  b, t, kh, h = v_BxTxKxH.shape
  if w == 0:
    return jnp.zeros_like(v_BxTxKxH)
  if history_BxPxKxH is None:
    history_BxPxKxH = jnp.zeros((b, w - 1, kh, h), v_BxTxKxH.dtype)
  chex.assert_shape(history_BxPxKxH, (b, w - 1, kh, h))
  x = jnp.concatenate([history_BxPxKxH.astype(v_BxTxKxH.dtype), v_BxTxKxH], axis=1)
  w_WxH = w_WxH.astype(v_BxTxKxH.dtype)
  return sum(w_WxH[i] * x[:, w - 1 - i:w - 1 - i + t] for i in range(w))


def conv_history(history_BxPxKxH: jnp.ndarray, v_BxTxKxH: jnp.ndarray,
                 n_B: jnp.ndarray) -> jnp.ndarray:
  """The last P values of each row after its first n_B new values (the rest is padding)."""
  p = history_BxPxKxH.shape[1]
  x = jnp.concatenate([history_BxPxKxH, v_BxTxKxH.astype(history_BxPxKxH.dtype)], axis=1)
  take = lambda row, i: jax.lax.dynamic_slice_in_dim(row, i, p, axis=0)  # noqa: E731
  return jax.vmap(take)(x, n_B)

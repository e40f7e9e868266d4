"""Rotary position embedding (RoFormer, Su et al. 2021, arXiv 2104.09864).

Each pair (x_i, x_{i+H/2}) of a head vector is rotated by the angle p * base^(-2i/H), where p is
the token's position: q_p . k_s then depends on positions only through p - s (eq. 34).
Shape contracts are chex assertions on static shapes (trace time).
"""

import chex
import jax.numpy as jnp
import numpy as np


def rope_angles(positions_BxT: jnp.ndarray | np.ndarray, head_dim: int, base: float = 10_000.0):
  """(cos, sin) of shape (B, T, 1, H/2) in float32; numpy constants for numpy positions."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
  chex.assert_rank(positions_BxT, 2, custom_message="rope_angles: positions_BxT")
  xp = np if isinstance(positions_BxT, np.ndarray) else jnp
  inv_freq_F = base ** (-xp.arange(0, head_dim, 2, dtype=xp.float32) / head_dim)
  angle_BxTxF = positions_BxT.astype(xp.float32)[..., None] * inv_freq_F
  return xp.cos(angle_BxTxF)[:, :, None, :], xp.sin(angle_BxTxF)[:, :, None, :]


def apply_rope(x_BxTxNxH: jnp.ndarray, positions_BxT: jnp.ndarray | None,
               base: float = 10_000.0) -> jnp.ndarray:
  """Rotates the two halves of each head vector; computed in float32, returned in x's dtype.

  positions None means 0..T-1 for every row: the tables are then compile-time constants.
  """
  chex.assert_rank(x_BxTxNxH, 4, custom_message="apply_rope: x_BxTxNxH")
  b, t = x_BxTxNxH.shape[:2]
  if positions_BxT is None:
    positions_BxT = np.arange(t)[None]
  else:
    chex.assert_shape(positions_BxT, ({1, b}, t), custom_message="apply_rope: positions_BxT")
  cos, sin = rope_angles(positions_BxT, x_BxTxNxH.shape[-1], base)
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)

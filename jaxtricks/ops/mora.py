"""MoRA's parameter-free compression and decompression (Jiang et al. 2024, arXiv 2405.12130).

MoRA replaces LoRA's pair A (d_in, r), B (r, d_out) by one square matrix M (r^, r^), zero at
initialisation, and no alpha scaling (scale 1). In the row-vector convention of our layers
(y = x W, W of shape (d_in, d_out), x of shape (R, d_in)):

    y = x W + f_decomp(f_comp(x) M)

with the same trainable count as LoRA when r^ = floor(sqrt((d_in + d_out) r)) (`mora_rank`;
the reference code rounds to nearest instead: 4096 -> 11008 at r = 8 gives 348 there, 347
here). f_comp and f_decomp have no parameters, so the update dW (d_in, d_out) is an explicit
matrix (`mora_delta_weight`) that merges into the kernel: W' = W + dW.

Operators (`OPERATORS`; numbers are the reference code's `mora_type`):

    truncation   -      f_comp(x) = x[:r^];  f_decomp zero-pads (or cuts) to d_out; lossy.
    sharing      1      Eq. 6: x folded into k = ceil(d_in / r^) rows of r^, rows summed
                        (group j = {i : i mod r^ = j}); f_decomp tiles r^ to d_out and cuts.
    decoupling   -      x split into k chunks of r^, M applied to each, the k outputs
                        concatenated, cut (or tiled) to d_out: dW = diag(M, ..., M)
                        when d_in = d_out = k r^.
    rotation     6      Eq. 9: decoupling with chunk i first rotated RoPE-style,
                        x_i -> x_i cos(i theta) + rotate_half(x_i) sin(i theta),
                        theta_j = 10000^(-2j / r^) (j < r^/2, repeated for the second half),
                        rotate_half(v) = (-v[r^/2:], v[:r^/2]); with x_i -> x_i R_i,
                        dW = diag(R_0 M, ..., R_(k-1) M) when d_in = d_out = k r^.

Padding: when r^ does not divide d_in, x is padded to k r^ entries by wrapping (appending x's
first entries, not zeros), as the reference code does; here the wrap is cyclic,
padded[p] = x[p mod d_in], which equals the reference whenever the pad is at most d_in long
(the reference cannot pad further). Decompression tiles the same way.

The reference README recommends sharing (type 1) for large ranks (r = 256) and rotation
(type 6) for small ones (r = 8); `default_operator` picks between them by rank.
Shape contracts are chex assertions on static shapes (trace time).
"""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np

from jaxtricks.errors import ConfigError

OPERATORS = ("truncation", "sharing", "decoupling", "rotation")

# From this LoRA rank on `default_operator` picks sharing: our choice, between the README's 8 and
# 256.
SHARING_MIN_RANK = 128


def _check_operator(operator: str) -> None:
  if operator not in OPERATORS:
    raise ConfigError(f"operator: unknown MoRA operator {operator!r}, expected one of {OPERATORS}")


def mora_rank(d_in: int, d_out: int, rank: int, operator: str) -> int:
  """r^ = floor(sqrt((d_in + d_out) rank)), so r^^2 <= LoRA's (d_in + d_out) rank parameters.

  Rotation rounds down to an even r^ (rotate-half); truncation caps r^ at min(d_in, d_out),
  since it keeps only the first r^ inputs and outputs.
  """
  _check_operator(operator)
  if rank < 1:
    raise ConfigError(f"rank: MoRA needs a LoRA rank >= 1, got {rank}")
  if d_in < 1 or d_out < 1:
    raise ConfigError(f"d_in, d_out: MoRA needs positive layer sizes, got {d_in}, {d_out}")
  r_hat = math.isqrt((d_in + d_out) * rank)
  if operator == "rotation":
    r_hat -= r_hat % 2
    if r_hat < 2:
      raise ConfigError(f"rank: rotation needs r_hat >= 2, got {r_hat} for {d_in}x{d_out}, "
                        f"rank {rank}")
  elif operator == "truncation":
    r_hat = min(r_hat, d_in, d_out)
  return r_hat


def default_operator(rank: int) -> str:
  """The operator for a LoRA rank: "sharing" for rank >= 128, else "rotation".

  The reference README recommends type 1 (sharing) for large ranks such as 256 and type 6
  (rotation) for small ones such as 8; the threshold 128 between them is ours, not the paper's.
  """
  if rank < 1:
    raise ConfigError(f"rank: MoRA needs a LoRA rank >= 1, got {rank}")
  return "sharing" if rank >= SHARING_MIN_RANK else "rotation"


def _wrap(v_RxN: jnp.ndarray, n_out: int) -> jnp.ndarray:
  """Cycles v along its last axis to n_out entries: out[:, p] = v[:, p mod N] (a cut if shorter)."""
  n = v_RxN.shape[-1]
  return jnp.tile(v_RxN, (1, -(-n_out // n)))[:, :n_out]


def _rotation_tables(k: int, r_hat: int) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), shape (k, r^), float64; chunk i, entry j: angle i 10000^(-2 (j mod r^/2) / r^)."""
  inv_freq_F = 10_000.0 ** (-np.arange(0, r_hat, 2, dtype=np.float64) / r_hat)
  angle_KxF = np.arange(k, dtype=np.float64)[:, None] * inv_freq_F
  angle_KxH = np.concatenate([angle_KxF, angle_KxF], axis=-1)
  return np.cos(angle_KxH), np.sin(angle_KxH)


def compress(x_RxI: jnp.ndarray, r_hat: int, operator: str) -> jnp.ndarray:
  """f_comp: (R, r^) for truncation and sharing, (R, k, r^) with k = ceil(d_in / r^) for
  decoupling and rotation. Returned in x's dtype (rotation is computed in at least float32)."""
  _check_operator(operator)
  chex.assert_rank(x_RxI, 2, custom_message="compress: x_RxI")
  r, d_in = x_RxI.shape
  if r_hat < 1:
    raise ConfigError(f"r_hat: MoRA needs r_hat >= 1, got {r_hat}")
  if operator == "truncation":
    if r_hat > d_in:
      raise ConfigError(f"r_hat: truncation keeps r_hat <= d_in inputs, got {r_hat} > {d_in}")
    return x_RxI[:, :r_hat]
  if operator == "rotation" and r_hat % 2:
    raise ConfigError(f"r_hat: rotation needs an even r_hat, got {r_hat}")
  k = -(-d_in // r_hat)
  x_RxKxH = _wrap(x_RxI, k * r_hat).reshape(r, k, r_hat)
  if operator == "sharing":
    return x_RxKxH.sum(axis=1)
  if operator == "decoupling":
    return x_RxKxH
  cos_KxH, sin_KxH = _rotation_tables(k, r_hat)
  dtype = jnp.promote_types(x_RxI.dtype, jnp.float32)
  x_RxKxH = x_RxKxH.astype(dtype)
  half_RxKxH = jnp.concatenate([-x_RxKxH[..., r_hat // 2:], x_RxKxH[..., :r_hat // 2]], axis=-1)
  out = x_RxKxH * jnp.asarray(cos_KxH, dtype) + half_RxKxH * jnp.asarray(sin_KxH, dtype)
  return out.astype(x_RxI.dtype)


def decompress(y: jnp.ndarray, d_out: int, operator: str) -> jnp.ndarray:
  """f_decomp: y (R, r^) for truncation and sharing, (R, k, r^) for decoupling and rotation,
  to (R, d_out)."""
  _check_operator(operator)
  if d_out < 1:
    raise ConfigError(f"d_out: MoRA needs d_out >= 1, got {d_out}")
  if operator in ("truncation", "sharing"):
    chex.assert_rank(y, 2, custom_message=f"decompress ({operator}): y_RxH")
    if operator == "sharing":
      return _wrap(y, d_out)
    pad = max(d_out - y.shape[-1], 0)
    return jnp.pad(y, ((0, 0), (0, pad)))[:, :d_out]
  chex.assert_rank(y, 3, custom_message=f"decompress ({operator}): y_RxKxH")
  return _wrap(y.reshape(y.shape[0], -1), d_out)


def mora_delta(x_RxI: jnp.ndarray, m_HxH: jnp.ndarray, d_out: int, operator: str) -> jnp.ndarray:
  """The MoRA update f_decomp(f_comp(x) M), shape (R, d_out); M is applied to every chunk."""
  chex.assert_rank([x_RxI, m_HxH], 2, custom_message="mora_delta: x_RxI, m_HxH")
  r_hat = m_HxH.shape[0]
  chex.assert_shape(m_HxH, (r_hat, r_hat), custom_message="mora_delta: m_HxH must be square")
  c = compress(x_RxI, r_hat, operator)
  if c.ndim == 2:
    y = jnp.einsum("rh,hg->rg", c, m_HxH)
  else:
    y = jnp.einsum("rkh,hg->rkg", c, m_HxH)
  return decompress(y, d_out, operator)


def mora_delta_weight(m_HxH: jnp.ndarray, d_in: int, d_out: int, operator: str) -> jnp.ndarray:
  """The explicit dW (d_in, d_out) with x @ dW == mora_delta(x, M): row i is the update of the
  unit input e_i (f_comp and f_decomp are linear). In M's dtype; merges as W' = W + dW."""
  if d_in < 1:
    raise ConfigError(f"d_in: MoRA needs d_in >= 1, got {d_in}")
  return mora_delta(jnp.eye(d_in, dtype=m_HxH.dtype), m_HxH, d_out, operator)

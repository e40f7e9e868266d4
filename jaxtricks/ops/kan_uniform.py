"""B-spline bases on a uniform grid in closed form (Liu et al. 2024, arXiv 2404.19756, eq. 2.10;
de Boor, "A Practical Guide to Splines", ch. IX).

On knots t_m = t_0 + m h every basis of order k is one translate of the cardinal B-spline N_k,
supported on [0, k + 1]:
    B_j(x) = N_k(u - j),  u = (x - t_0) / h,   B'_j(x) = N'_k(u - j) / h
(computed from the grid's centre, v = u - (M - 1) / 2, to keep float32 precision).
With a = |s - (k + 1) / 2| (N_k is symmetric about the middle of its support):
    N_0(s) = [0 <= s < 1]
    N_1(s) = max(0, 1 - a)
    N_2(s) = 3/4 - a^2                 (a < 1/2),   (3/2 - a)^2 / 2      (1/2 <= a < 3/2)
    N_3(s) = 2/3 - a^2 + a^3 / 2       (a < 1),     (2 - a)^3 / 6        (1 <= a < 2)
and zero elsewhere. Each plane j is then a few elementwise ops on u, with no indicator planes, no
lower-order planes and no divisions by knot spacings; the backward pass rebuilds N'_k from x
alone, so nothing but x is saved. Orders above 3 use the uniform Cox-de Boor recursion in u,
N_p(s) = (s N_(p-1)(s) + (p + 1 - s) N_(p-1)(s - 1)) / p. The general recursion
(`jaxtricks.ops.kan`) stays for knots moved by grid updates; the layer chooses by its state.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

CLOSED_FORM_ORDERS = (0, 1, 2, 3)


def spacing(grid_IxM: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(centre, 1 / h) per input of a uniform knot vector (I, M), M >= 2, from its end knots (the
  spacing of two neighbouring float32 knots is off by their rounding, ~1e-6 relative)."""
  first, last = grid_IxM[:, 0], grid_IxM[:, -1]
  return 0.5 * (first + last), (grid_IxM.shape[1] - 1) / (last - first)


def cardinal(d: jnp.ndarray, order: int) -> jnp.ndarray:
  """N_k(s) at d = s - (k + 1) / 2, the offset from the middle of its support [0, k + 1]."""
  if order == 0:
    return ((d >= -0.5) & (d < 0.5)).astype(d.dtype)
  if order > 3:
    s = d + (order + 1) / 2
    return (s * cardinal(d + 0.5, order - 1) + (order + 1 - s) * cardinal(d - 0.5, order - 1)
            ) / order
  a = jnp.abs(d)
  if order == 1:
    return jnp.maximum(0.0, 1.0 - a)
  if order == 2:
    outer = 0.5 * jnp.square(jnp.maximum(0.0, 1.5 - a))
    return jnp.where(a < 0.5, 0.75 - a * a, outer)
  outer = jnp.maximum(0.0, 2.0 - a)
  return jnp.where(a < 1.0, 2.0 / 3.0 - a * a * (1.0 - 0.5 * a), outer * outer * outer / 6.0)


def cardinal_derivative(d: jnp.ndarray, order: int) -> jnp.ndarray:
  """N'_k at d = s - (k + 1) / 2: N_(k-1)(s) - N_(k-1)(s - 1) (zero for k = 0, as the
  recursion's convention)."""
  if order == 0:
    return jnp.zeros_like(d)
  if order == 1 or order > 3:  # order 1: the step's convention at the knots, as the recursion's
    return cardinal(d + 0.5, order - 1) - cardinal(d - 0.5, order - 1)
  a, sign = jnp.abs(d), jnp.sign(d)
  if order == 2:
    return jnp.where(a < 0.5, -2.0 * d, -sign * jnp.maximum(0.0, 1.5 - a))
  outer = jnp.maximum(0.0, 2.0 - a)
  return jnp.where(a < 1.0, d * (1.5 * a - 2.0), -0.5 * sign * outer * outer)


def _offsets(n_basis: int, order: int) -> list[float]:
  """c_j with u - j - (k + 1) / 2 = v - c_j, v the position from the grid's centre in steps
  (M - 1 = n_basis + k knot steps): the offsets are exact half-integers, so d_j keeps v's
  precision instead of rounding at |u| ~ M."""
  mid = (n_basis + order) / 2
  return [j + (order + 1) / 2 - mid for j in range(n_basis)]


def _cardinal_planes(x_NxI, centre_I, inv_h_I, n_basis, order):
  """(N, J, I) from one broadcast of v against the offsets: a single fused loop, where a stack
  of J planes costs J fusions and a copy on XLA:CPU."""
  v_NxI = (x_NxI - centre_I) * inv_h_I
  c_J = jnp.asarray(_offsets(n_basis, order), x_NxI.dtype)
  return cardinal(v_NxI[:, None, :] - c_J[None, :, None], order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _features(x_NxI, centre_I, inv_h_I, n_basis, order, with_silu):
  planes_NxJxI = _cardinal_planes(x_NxI, centre_I, inv_h_I, n_basis, order)
  if not with_silu:
    return planes_NxJxI
  return jnp.concatenate([planes_NxJxI, jax.nn.silu(x_NxI)[:, None]], axis=1)


def _features_fwd(x_NxI, centre_I, inv_h_I, n_basis, order, with_silu):
  return (_features(x_NxI, centre_I, inv_h_I, n_basis, order, with_silu),
          (x_NxI, centre_I, inv_h_I))


def _features_bwd(n_basis, order, with_silu, res, g_NxKxI):
  x_NxI, centre_I, inv_h_I = res
  v_NxI = (x_NxI - centre_I) * inv_h_I
  # Row-wise multiply-adds over j, one fused pass over g; XLA:CPU runs a reduction over the
  # middle axis 5-15x slower (benchmarks/kan.py).
  offsets = _offsets(n_basis, order)
  dv_NxI = g_NxKxI[:, 0] * cardinal_derivative(v_NxI - offsets[0], order)
  for j in range(1, n_basis):
    dv_NxI = dv_NxI + g_NxKxI[:, j] * cardinal_derivative(v_NxI - offsets[j], order)
  dx_NxI = dv_NxI * inv_h_I
  if with_silu:
    sig = jax.nn.sigmoid(x_NxI)
    dx_NxI = dx_NxI + g_NxKxI[:, n_basis] * sig * (1.0 + x_NxI * (1.0 - sig))
  # The knots are a buffer: no cotangent flows to them (as in jaxtricks.ops.kan).
  return dx_NxI, jnp.zeros_like(centre_I), jnp.zeros_like(inv_h_I)


_features.defvjp(_features_fwd, _features_bwd)


def _spacing_of(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, order: int, name: str):
  chex.assert_rank([x_NxI, grid_IxM], 2, custom_message=f"{name}: x_NxI, grid_IxM")
  chex.assert_axis_dimension(grid_IxM, 0, x_NxI.shape[1], custom_message=f"{name}: grid_IxM")
  n_basis = grid_IxM.shape[1] - order - 1
  if n_basis < 1:
    raise ValueError(f"grid must be (I, G + 2k + 1 >= {order + 2}) for order {order}, got "
                     f"{grid_IxM.shape}")
  centre_I, inv_h_I = spacing(jax.lax.stop_gradient(grid_IxM.astype(x_NxI.dtype)))
  return centre_I, inv_h_I, int(n_basis)


def uniform_planes(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, order: int) -> jnp.ndarray:
  """`jaxtricks.ops.kan.bspline_planes` for uniform knots (I, G + 2k + 1): (N, I) -> (N, G + k, I),
  with its analytic input gradient. The knots must be uniform per input (the caller knows it
  from the layer's state; it is not checked here)."""
  centre_I, inv_h_I, n_basis = _spacing_of(x_NxI, grid_IxM, order, "uniform_planes")
  return _features(x_NxI, centre_I, inv_h_I, n_basis, int(order), False)


def uniform_features(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, order: int) -> jnp.ndarray:
  """The matmul form's features [bases, silu(x)] (N, G + k + 1, I) for uniform knots, forward in
  one pass over x and backward (bases' derivative and silu's) in one pass over the cotangent;
  `jaxtricks.ops.kan.kan_matmul_features` takes them."""
  centre_I, inv_h_I, n_basis = _spacing_of(x_NxI, grid_IxM, order, "uniform_features")
  return _features(x_NxI, centre_I, inv_h_I, n_basis, int(order), True)

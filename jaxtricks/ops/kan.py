"""Kolmogorov-Arnold layer maths (Liu et al. 2024, arXiv 2404.19756): B-spline, RBF and Chebyshev
bases and the two forms of a KAN layer.

A layer with I inputs and O outputs computes y_o = sum_i phi_{o,i}(x_i), with
    phi_{o,i}(x) = w_b[i, o] silu(x) + w_s[i, o] sum_j c[i, o, j] B_j(x)          (paper eq. 2.10)
B-splines of order k on G intervals (Cox-de Boor):
    B_{j,0}(x) = [t_j <= x < t_{j+1}],
    B_{j,p}(x) = (x - t_j) / (t_{j+p} - t_j) B_{j,p-1}(x)
                 + (t_{j+p+1} - x) / (t_{j+p+1} - t_{j+1}) B_{j+1,p-1}(x),
    B'_{j,p}(x) = p / (t_{j+p} - t_j) B_{j,p-1}(x) - p / (t_{j+p+1} - t_{j+1}) B_{j+1,p-1}(x).
Each input has its own knot vector of G + 2k + 1 knots (k extra at each end), giving G + k bases.

The matmul form (efficient-kan's formulation) flattens the bases to (N, I (G + k)) and multiplies
by one (I (G + k), O) matrix; the per-edge form (pykan's) materialises phi for every (n, o, i),
which pruning, attribution and symbolic fitting need. They agree to float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def uniform_grid(n_in: int, grid_size: int, order: int, lo: float = -1.0,
                 hi: float = 1.0, dtype=jnp.float32) -> jnp.ndarray:
  """(I, G + 2k + 1) knots: G equal intervals on [lo, hi], extended by k knots on each side."""
  if grid_size < 1 or order < 0 or not hi > lo:
    raise ValueError(f"a grid needs grid_size >= 1, order >= 0 and hi > lo; got {grid_size}, "
                     f"{order}, [{lo}, {hi}]")
  h = (hi - lo) / grid_size
  knots = (lo + h * jnp.arange(-order, grid_size + order + 1)).astype(dtype)
  return jnp.broadcast_to(knots, (n_in, knots.shape[0]))


def _ratio(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num / den with the B-spline convention 0/0 = 0 (repeated knots give no NaN)."""
  zero = den == 0
  return jnp.where(zero, 0.0, num / jnp.where(zero, 1.0, den))


def _cox_de_boor(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, order: int
                 ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """Bases of order k (N, I, M - k - 1) and of order k - 1 (N, I, M - k), None when k = 0."""
  x = x_NxI[:, :, None]
  t = grid_IxM[None]
  basis = ((x >= t[..., :-1]) & (x < t[..., 1:])).astype(x_NxI.dtype)
  lower = None
  for p in range(1, order + 1):
    lower = basis
    left = _ratio(x - t[..., :-(p + 1)], t[..., p:-1] - t[..., :-(p + 1)])
    right = _ratio(t[..., p + 1:] - x, t[..., p + 1:] - t[..., 1:-p])
    basis = left * basis[..., :-1] + right * basis[..., 1:]
  return basis, lower


def _basis_derivative_from_lower(lower_NxIxJ: jnp.ndarray | None, grid_IxM: jnp.ndarray,
                                 order: int, like: jnp.ndarray) -> jnp.ndarray:
  if order == 0:
    return jnp.zeros_like(like)
  t = grid_IxM[None]
  k = order
  left = _ratio(jnp.full_like(t[..., k:-1], k), t[..., k:-1] - t[..., :-(k + 1)])
  right = _ratio(jnp.full_like(t[..., k + 1:], k), t[..., k + 1:] - t[..., 1:-k])
  return left * lower_NxIxJ[..., :-1] - right * lower_NxIxJ[..., 1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _basis(x_NxI, grid_IxM, order):
  return _cox_de_boor(x_NxI, grid_IxM, order)[0]


def _basis_fwd(x_NxI, grid_IxM, order):
  basis, lower = _cox_de_boor(x_NxI, grid_IxM, order)
  return basis, (lower, grid_IxM, basis)


def _basis_bwd(order, res, g_NxIxJ):
  lower, grid_IxM, basis = res
  d_NxIxJ = _basis_derivative_from_lower(lower, grid_IxM, order, basis)
  # The knots are a buffer (moved by grid updates, not by gradients): no cotangent flows to them.
  return jnp.sum(g_NxIxJ * d_NxIxJ, axis=-1), jnp.zeros_like(grid_IxM)


_basis.defvjp(_basis_fwd, _basis_bwd)


def bspline_basis(x: jnp.ndarray, grid: jnp.ndarray, order: int) -> jnp.ndarray:
  """B-spline basis values: x (..., I), grid (I, G + 2k + 1) knots -> (..., I, G + k).

  Zero outside [t_0, t_last); inside [t_k, t_{G+k}] the bases sum to 1. The gradient with respect
  to x is the analytic derivative (one pass of order k - 1 bases saved from the forward pass),
  not autodiff through the recursion; the knots get no gradient.
  """
  n_in = x.shape[-1]
  if grid.ndim != 2 or grid.shape[0] != n_in or grid.shape[1] < order + 2:
    raise ValueError(f"grid must be (I={n_in}, G + 2k + 1 >= {order + 2}) for order {order}, "
                     f"got {grid.shape}")
  lead = x.shape[:-1]
  out = _basis(x.reshape(-1, n_in), grid.astype(x.dtype), int(order))
  return out.reshape(*lead, n_in, out.shape[-1])


def bspline_basis_derivative(x: jnp.ndarray, grid: jnp.ndarray, order: int) -> jnp.ndarray:
  """d/dx of `bspline_basis`, same shape (..., I, G + k)."""
  n_in = x.shape[-1]
  basis, lower = _cox_de_boor(x.reshape(-1, n_in), grid.astype(x.dtype), order)
  d = _basis_derivative_from_lower(lower, grid.astype(x.dtype), order, basis)
  return d.reshape(*x.shape, d.shape[-1])


def rbf_basis(x: jnp.ndarray, centres_J: jnp.ndarray, width: float) -> jnp.ndarray:
  """Gaussian radial bases exp(-((x - u_j) / h)^2) (FastKAN): (..., I) -> (..., I, J)."""
  return jnp.exp(-jnp.square((x[..., None] - centres_J) / width))


def chebyshev_basis(x: jnp.ndarray, degree: int) -> jnp.ndarray:
  """T_0..T_degree of tanh(x) (ChebyKAN), by the recurrence T_{d+1} = 2 u T_d - T_{d-1}:
  (..., I) -> (..., I, degree + 1)."""
  u = jnp.tanh(x)
  terms = [jnp.ones_like(u), u]
  for _ in range(degree - 1):
    terms.append(2 * u * terms[-1] - terms[-2])
  return jnp.stack(terms[:degree + 1], axis=-1)


def kan_matmul(x_NxI: jnp.ndarray, basis_NxIxJ: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
               w_base_IxO: jnp.ndarray, w_spline_IxO: jnp.ndarray) -> jnp.ndarray:
  """y (N, O) = silu(x) W_b + bases (N, I J) @ C (I J, O), C[i j, o] = w_s[i, o] c[i, o, j]."""
  n, i, j = basis_NxIxJ.shape
  c_IxJxO = jnp.einsum("IOJ,IO->IJO", coef_IxOxJ, w_spline_IxO)
  return jax.nn.silu(x_NxI) @ w_base_IxO + basis_NxIxJ.reshape(n, i * j) @ c_IxJxO.reshape(
      i * j, -1)


def kan_edges(x_NxI: jnp.ndarray, basis_NxIxJ: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
              w_base_IxO: jnp.ndarray, w_spline_IxO: jnp.ndarray) -> jnp.ndarray:
  """phi (N, O, I) of every edge; y = phi.sum(-1) equals `kan_matmul`."""
  spline_NxOxI = jnp.einsum("NIJ,IOJ->NOI", basis_NxIxJ, coef_IxOxJ)
  return (w_base_IxO.T[None] * jax.nn.silu(x_NxI)[:, None, :]
          + w_spline_IxO.T[None] * spline_NxOxI)


def solve_least_squares(a_BxNxJ: jnp.ndarray, y_BxNxO: jnp.ndarray,
                        ridge: float = 1e-8) -> jnp.ndarray:
  """Batched min_c ||A c - y||^2 + lam ||c||^2 -> (B, J, O), lam = ridge * mean diag(A^T A).

  The ridge makes the normal equations positive definite, so empty intervals, repeated samples
  or a single sample per interval give a finite answer (the minimum-norm-like one), never NaN;
  if the solve still fails numerically, the pseudo-inverse answer is returned instead.
  """
  ata = jnp.einsum("BNJ,BNK->BJK", a_BxNxJ, a_BxNxJ)
  aty = jnp.einsum("BNJ,BNO->BJO", a_BxNxJ, y_BxNxO)
  j = ata.shape[-1]
  scale = jnp.trace(ata, axis1=1, axis2=2)[:, None, None] / j
  lam = ridge * scale + jnp.finfo(ata.dtype).tiny
  c = jnp.linalg.solve(ata + lam * jnp.eye(j, dtype=ata.dtype), aty)
  fallback = jnp.einsum("BJN,BNO->BJO", jnp.linalg.pinv(a_BxNxJ), y_BxNxO)
  return jnp.where(jnp.all(jnp.isfinite(c)), c, fallback)


def grid_from_samples(x_NxI: jnp.ndarray, grid_size: int, order: int,
                      grid_eps: float = 0.02) -> jnp.ndarray:
  """Knots (I, G + 2k + 1) that follow the samples (pykan's update_grid): interior knots
  grid_eps * uniform + (1 - grid_eps) * quantiles over [min, max], extended by k uniform steps."""
  n = x_NxI.shape[0]
  xs = jnp.sort(x_NxI, axis=0)
  idx = jnp.round(jnp.linspace(0, n - 1, grid_size + 1)).astype(jnp.int32)
  adaptive_GxI = xs[idx]
  lo, hi = xs[0], xs[-1]
  h_I = (hi - lo) / grid_size
  h_I = jnp.where(h_I > 0, h_I, 1e-3 * (jnp.abs(lo) + 1.0))  # all samples equal: a small grid
  uniform_GxI = lo + h_I * jnp.arange(grid_size + 1)[:, None]
  inner = grid_eps * uniform_GxI + (1 - grid_eps) * adaptive_GxI
  left = inner[:1] - h_I * jnp.arange(order, 0, -1)[:, None]
  right = inner[-1:] + h_I * jnp.arange(1, order + 1)[:, None]
  return jnp.concatenate([left, inner, right], axis=0).T


def fit_coefficients(x_NxI: jnp.ndarray, values_NxIxO: jnp.ndarray, grid_IxM: jnp.ndarray,
                     order: int, ridge: float = 1e-8) -> jnp.ndarray:
  """Coefficients (I, O, J) whose splines on `grid` best match `values` at the samples."""
  basis_IxNxJ = jnp.swapaxes(bspline_basis(x_NxI, grid_IxM, order), 0, 1)
  coef_IxJxO = solve_least_squares(basis_IxNxJ, jnp.swapaxes(values_NxIxO, 0, 1), ridge)
  return jnp.swapaxes(coef_IxJxO, 1, 2)


def spline_values(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
                  order: int) -> jnp.ndarray:
  """sum_j c[i, o, j] B_j(x_i): (N, I, O), the spline part of every edge before w_s."""
  return jnp.einsum("NIJ,IOJ->NIO", bspline_basis(x_NxI, grid_IxM, order), coef_IxOxJ)

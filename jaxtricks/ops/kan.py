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
by one (I (G + k), O) matrix; here silu(x) rides along as one more basis plane, so forward is one
(N, (G + k + 1) I) @ ((G + k + 1) I, O) matmul and backward two. The per-edge form (pykan's)
materialises phi for every (n, o, i), which pruning, attribution and symbolic fitting need. They
agree to float32 rounding. Bases are computed as planes (N, J, I) (inputs contiguous), with an
analytic derivative in a custom VJP; `python -m benchmarks.kan` times the layer against its
matmuls and the peers (README has the figures). Shape contracts are chex assertions on static
shapes (trace time).
"""

from __future__ import annotations

import functools

import chex
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


def _inverse(den: jnp.ndarray) -> jnp.ndarray:
  """1 / den with the B-spline convention 0/0 = 0 (repeated knots give no NaN)."""
  zero = den == 0
  return jnp.where(zero, 0.0, 1.0 / jnp.where(zero, 1.0, den))


def _cox_de_boor(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, order: int
                 ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
  """Bases of order k (N, M - k - 1, I) and of order k - 1 (N, M - k, I), None when k = 0.

  Basis index in the middle, inputs last: every step of the recursion is an elementwise op on
  contiguous rows of I values, and the result reshapes for free to the matmul form's
  (N, J I) operand. The knot spacings are inverted once per input, not once per sample.
  """
  x = x_NxI[:, None, :]
  t = grid_IxM.T[None]  # (1, M, I)
  basis = ((x >= t[:, :-1]) & (x < t[:, 1:])).astype(x_NxI.dtype)
  lower = None
  for p in range(1, order + 1):
    lower = basis
    left = _inverse(t[:, p:-1] - t[:, :-(p + 1)])
    right = _inverse(t[:, p + 1:] - t[:, 1:-p])
    basis = ((x - t[:, :-(p + 1)]) * left * basis[:, :-1]
             + (t[:, p + 1:] - x) * right * basis[:, 1:])
  return basis, lower


def _derivative_from_lower(lower_NxJxI: jnp.ndarray | None, grid_IxM: jnp.ndarray, order: int,
                           like: jnp.ndarray) -> jnp.ndarray:
  if order == 0:
    return jnp.zeros_like(like)
  t, k = grid_IxM.T[None], order
  left = k * _inverse(t[:, k:-1] - t[:, :-(k + 1)])
  right = k * _inverse(t[:, k + 1:] - t[:, 1:-k])
  return left * lower_NxJxI[:, :-1] - right * lower_NxJxI[:, 1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _planes(x_NxI, grid_IxM, order):
  return _cox_de_boor(x_NxI, grid_IxM, order)[0]


def _planes_fwd(x_NxI, grid_IxM, order):
  basis, lower = _cox_de_boor(x_NxI, grid_IxM, order)
  return basis, (lower, grid_IxM, basis)


def _planes_bwd(order, res, g_NxJxI):
  lower, grid_IxM, basis = res
  d_NxJxI = _derivative_from_lower(lower, grid_IxM, order, basis)
  # sum_j g d as J row-wise multiply-adds: XLA:CPU runs this 5-15x faster than a reduction over
  # the middle axis (benchmarks/kan.py).
  dx_NxI = g_NxJxI[:, 0] * d_NxJxI[:, 0]
  for j in range(1, d_NxJxI.shape[1]):
    dx_NxI = dx_NxI + g_NxJxI[:, j] * d_NxJxI[:, j]
  # The knots are a buffer (moved by grid updates, not by gradients): no cotangent flows to them.
  return dx_NxI, jnp.zeros_like(grid_IxM)


_planes.defvjp(_planes_fwd, _planes_bwd)


def _check_grid(n_in: int, grid: jnp.ndarray, order: int) -> None:
  if grid.ndim != 2 or grid.shape[0] != n_in or grid.shape[1] < order + 2:
    raise ValueError(f"grid must be (I={n_in}, G + 2k + 1 >= {order + 2}) for order {order}, "
                     f"got {grid.shape}")


def bspline_planes(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, order: int,
                   analytic_grad: bool = True) -> jnp.ndarray:
  """B-spline basis values in the matmul form's layout: (N, I) -> (N, G + k, I).

  With analytic_grad the gradient with respect to x is the analytic derivative (the order k - 1
  bases saved from the forward pass), not autodiff through the recursion; the knots get no
  gradient either way.
  """
  chex.assert_rank(x_NxI, 2, custom_message="bspline_planes: x_NxI")
  _check_grid(x_NxI.shape[-1], grid_IxM, order)
  grid_IxM = grid_IxM.astype(x_NxI.dtype)
  if analytic_grad:
    return _planes(x_NxI, grid_IxM, int(order))
  return _cox_de_boor(x_NxI, jax.lax.stop_gradient(grid_IxM), int(order))[0]


def bspline_basis(x: jnp.ndarray, grid: jnp.ndarray, order: int,
                  analytic_grad: bool = True) -> jnp.ndarray:
  """B-spline basis values: x (..., I), grid (I, G + 2k + 1) knots -> (..., I, G + k).

  Zero outside [t_0, t_last); inside [t_k, t_{G+k}] the bases sum to 1. Gradients as in
  `bspline_planes`.
  """
  n_in = x.shape[-1]
  planes = bspline_planes(x.reshape(-1, n_in), grid, order, analytic_grad)
  return jnp.swapaxes(planes, 1, 2).reshape(*x.shape, planes.shape[1])


def bspline_basis_derivative(x: jnp.ndarray, grid: jnp.ndarray, order: int) -> jnp.ndarray:
  """d/dx of `bspline_basis`, same shape (..., I, G + k)."""
  n_in = x.shape[-1]
  _check_grid(n_in, grid, order)
  grid = grid.astype(x.dtype)
  basis, lower = _cox_de_boor(x.reshape(-1, n_in), grid, order)
  d_NxJxI = _derivative_from_lower(lower, grid, order, basis)
  return jnp.swapaxes(d_NxJxI, 1, 2).reshape(*x.shape, d_NxJxI.shape[1])


def rbf_basis(x: jnp.ndarray, centres_J: jnp.ndarray, width: float) -> jnp.ndarray:
  """Gaussian radial bases exp(-((x - u_j) / h)^2) (FastKAN): (..., I) -> (..., I, J)."""
  chex.assert_rank(centres_J, 1, custom_message="rbf_basis: centres_J")
  return jnp.exp(-jnp.square((x[..., None] - centres_J) / width))


def chebyshev_basis(x: jnp.ndarray, degree: int) -> jnp.ndarray:
  """T_0..T_degree of tanh(x) (ChebyKAN), by the recurrence T_{d+1} = 2 u T_d - T_{d-1}:
  (..., I) -> (..., I, degree + 1)."""
  if degree < 0:
    raise ValueError(f"a Chebyshev basis needs degree >= 0, got {degree}")
  u = jnp.tanh(x)
  terms = [jnp.ones_like(u), u]
  for _ in range(degree - 1):
    terms.append(2 * u * terms[-1] - terms[-2])
  return jnp.stack(terms[:degree + 1], axis=-1)


def _check_layer(name: str, x_NxI, basis, coef_IxOxJ, w_base_IxO, w_spline_IxO,
                 layout: str) -> None:
  """x (N, I), bases (N, J, I) or (N, I, J) as `layout` says, c (I, O, J), w_b and w_s (I, O)."""
  chex.assert_rank([x_NxI, basis, coef_IxOxJ, w_base_IxO, w_spline_IxO], [2, 3, 3, 2, 2],
                   custom_message=f"{name}: x, basis, coef, w_base, w_spline")
  n, i = x_NxI.shape
  j = basis.shape[layout.index("J")]
  chex.assert_shape(basis, tuple({"N": n, "I": i, "J": j}[a] for a in layout),
                    custom_message=f"{name}: basis_{'x'.join(layout)}")
  chex.assert_shape(coef_IxOxJ, (i, None, j), custom_message=f"{name}: coef_IxOxJ")
  chex.assert_shape([w_base_IxO, w_spline_IxO], coef_IxOxJ.shape[:2],
                    custom_message=f"{name}: w_base_IxO, w_spline_IxO")


def matmul_coefficients(coef_IxOxJ: jnp.ndarray, w_base_IxO: jnp.ndarray,
                        w_spline_IxO: jnp.ndarray) -> jnp.ndarray:
  """[C; W_b] ((J + 1) I, O), C[j i, o] = w_s[i, o] c[i, o, j]: the matmul form's weights."""
  c_KxIxO = jnp.concatenate([jnp.einsum("IOJ,IO->JIO", coef_IxOxJ, w_spline_IxO),
                             w_base_IxO[None]], axis=0)
  return c_KxIxO.reshape(-1, c_KxIxO.shape[-1])


def kan_matmul_features(feats_NxKxI: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
                        w_base_IxO: jnp.ndarray, w_spline_IxO: jnp.ndarray) -> jnp.ndarray:
  """y (N, O) from features [bases, silu(x)] (N, J + 1, I), one matmul."""
  chex.assert_rank(feats_NxKxI, 3, custom_message="kan_matmul_features: feats_NxKxI")
  n, k, i = feats_NxKxI.shape
  chex.assert_shape(coef_IxOxJ, (i, None, k - 1), custom_message="kan_matmul_features: coef")
  return feats_NxKxI.reshape(n, k * i) @ matmul_coefficients(coef_IxOxJ, w_base_IxO,
                                                             w_spline_IxO)


def kan_matmul_planes(x_NxI: jnp.ndarray, basis_NxJxI: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
                      w_base_IxO: jnp.ndarray, w_spline_IxO: jnp.ndarray) -> jnp.ndarray:
  """y (N, O) = [bases, silu(x)] (N, (J + 1) I) @ [C; W_b] ((J + 1) I, O), one matmul, with
  C[j i, o] = w_s[i, o] c[i, o, j]: silu(x) is the (J + 1)-th basis plane, W_b its coefficients."""
  _check_layer("kan_matmul_planes", x_NxI, basis_NxJxI, coef_IxOxJ, w_base_IxO, w_spline_IxO,
               "NJI")
  feats_NxKxI = jnp.concatenate([basis_NxJxI, jax.nn.silu(x_NxI)[:, None, :]], axis=1)
  return kan_matmul_features(feats_NxKxI, coef_IxOxJ, w_base_IxO, w_spline_IxO)


def kan_matmul(x_NxI: jnp.ndarray, basis_NxIxJ: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
               w_base_IxO: jnp.ndarray, w_spline_IxO: jnp.ndarray) -> jnp.ndarray:
  """`kan_matmul_planes` for bases in the (N, I, J) layout of `bspline_basis`."""
  _check_layer("kan_matmul", x_NxI, basis_NxIxJ, coef_IxOxJ, w_base_IxO, w_spline_IxO, "NIJ")
  return kan_matmul_planes(x_NxI, jnp.swapaxes(basis_NxIxJ, 1, 2), coef_IxOxJ, w_base_IxO,
                           w_spline_IxO)


def kan_edges(x_NxI: jnp.ndarray, basis_NxIxJ: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
              w_base_IxO: jnp.ndarray, w_spline_IxO: jnp.ndarray) -> jnp.ndarray:
  """phi (N, O, I) of every edge; y = phi.sum(-1) equals `kan_matmul`."""
  _check_layer("kan_edges", x_NxI, basis_NxIxJ, coef_IxOxJ, w_base_IxO, w_spline_IxO, "NIJ")
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
  chex.assert_rank([a_BxNxJ, y_BxNxO], 3, custom_message="solve_least_squares: a, y")
  chex.assert_equal_shape_prefix([a_BxNxJ, y_BxNxO], 2, custom_message="solve_least_squares")
  ata = jnp.einsum("BNJ,BNK->BJK", a_BxNxJ, a_BxNxJ)
  aty = jnp.einsum("BNJ,BNO->BJO", a_BxNxJ, y_BxNxO)
  j = ata.shape[-1]
  scale = jnp.trace(ata, axis1=1, axis2=2)[:, None, None] / j
  lam = ridge * scale + jnp.finfo(ata.dtype).tiny
  c = jnp.linalg.solve(ata + lam * jnp.eye(j, dtype=ata.dtype), aty)
  fallback = jnp.einsum("BJN,BNO->BJO", jnp.linalg.pinv(a_BxNxJ), y_BxNxO)
  return jnp.where(jnp.all(jnp.isfinite(c)), c, fallback)


def grid_from_samples(x_NxI: jnp.ndarray, grid_size: int, order: int,
                      grid_eps: float = 0.02,
                      span: tuple[float, float] | None = None) -> jnp.ndarray:
  """Knots (I, G + 2k + 1) that follow the samples (pykan's update_grid): interior knots
  grid_eps * uniform + (1 - grid_eps) * quantiles over [min, max], extended by k uniform steps.
  With span = (lo, hi) the end knots reach at least lo and hi, so inputs of a known domain that
  fall just outside the samples' hull are interpolated rather than extrapolated."""
  chex.assert_rank(x_NxI, 2, custom_message="grid_from_samples: x_NxI")
  n = x_NxI.shape[0]
  xs = jnp.sort(x_NxI, axis=0)
  idx = jnp.round(jnp.linspace(0, n - 1, grid_size + 1)).astype(jnp.int32)
  adaptive_GxI = xs[idx]
  lo, hi = xs[0], xs[-1]
  if span is not None:
    lo, hi = jnp.minimum(lo, span[0]), jnp.maximum(hi, span[1])
    adaptive_GxI = adaptive_GxI.at[0].set(lo).at[-1].set(hi)
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
  chex.assert_rank(x_NxI, 2, custom_message="fit_coefficients: x_NxI")
  chex.assert_shape(values_NxIxO, (*x_NxI.shape, None), custom_message="fit_coefficients: values")
  basis_IxNxJ = jnp.swapaxes(bspline_basis(x_NxI, grid_IxM, order), 0, 1)
  coef_IxJxO = solve_least_squares(basis_IxNxJ, jnp.swapaxes(values_NxIxO, 0, 1), ridge)
  return jnp.swapaxes(coef_IxJxO, 1, 2)


def spline_values(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, coef_IxOxJ: jnp.ndarray,
                  order: int) -> jnp.ndarray:
  """sum_j c[i, o, j] B_j(x_i): (N, I, O), the spline part of every edge before w_s."""
  chex.assert_rank(x_NxI, 2, custom_message="spline_values: x_NxI")
  chex.assert_shape(coef_IxOxJ, (x_NxI.shape[1], None, grid_IxM.shape[-1] - order - 1),
                    custom_message="spline_values: coef_IxOxJ")
  return jnp.einsum("NIJ,IOJ->NIO", bspline_basis(x_NxI, grid_IxM, order), coef_IxOxJ)


def refit_matrix(x_NxI: jnp.ndarray, grid_IxM: jnp.ndarray, new_grid_IxL: jnp.ndarray,
                 order: int, ridge: float = 1e-8) -> jnp.ndarray:
  """M (I, G' + k, G + k): `fit_coefficients` onto `new_grid` of the splines on `grid` is the
  linear map c'[i, o] = M[i] c[i, o] (the same ridge least squares at the samples)."""
  chex.assert_rank(x_NxI, 2, custom_message="refit_matrix: x_NxI")
  old_IxNxJ = jnp.swapaxes(bspline_basis(x_NxI, grid_IxM, order), 0, 1)
  new_IxNxK = jnp.swapaxes(bspline_basis(x_NxI, new_grid_IxL, order), 0, 1)
  return solve_least_squares(new_IxNxK, old_IxNxJ, ridge)

"""KAN bases and layer forms against independent references: scipy's B-splines, finite
differences, autodiff through the recursion, and the per-edge sum; the chex shape contracts. The
custom-VJP basis and the layer forms run eagerly and under jit (chex variants)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import BSpline

from jaxtricks.ops import kan


def _scipy_bases(x, knots, k):
  """(N, G + k) basis values from scipy: one design row per sample."""
  n_basis = len(knots) - k - 1
  out = np.zeros((len(x), n_basis))
  for j in range(n_basis):
    c = np.zeros(n_basis)
    c[j] = 1.0
    out[:, j] = BSpline(knots, c, k, extrapolate=False)(x)
  return np.nan_to_num(out)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("grid_size", [1, 5])
def test_bspline_basis_matches_scipy(order, grid_size):
  grid = kan.uniform_grid(2, grid_size, order, -1.0, 1.0)
  x = np.random.default_rng(0).uniform(-1.0, 1.0, (200, 2)).astype(np.float32)
  basis = np.asarray(kan.bspline_basis(jnp.asarray(x), grid, order))
  chex.assert_shape(basis, (200, 2, grid_size + order))
  for i in range(2):
    chex.assert_trees_all_close(basis[:, i], _scipy_bases(x[:, i], np.asarray(grid[i]), order),
                                rtol=1e-7, atol=2e-6)


def test_partition_of_unity_inside_the_grid_and_zero_outside():
  order, g = 3, 7
  grid = kan.uniform_grid(3, g, order, -2.0, 3.0)
  x = jnp.linspace(-2.0, 2.999, 101)[:, None].repeat(3, 1)
  chex.assert_trees_all_close(kan.bspline_basis(x, grid, order).sum(-1), 1.0, rtol=1e-7,
                              atol=1e-5)
  far = jnp.full((4, 3), 100.0)
  assert float(jnp.abs(kan.bspline_basis(far, grid, order)).max()) == 0.0


def _weighted_basis_sum(x, grid, w, analytic_grad):
  return jnp.sum(kan.bspline_basis(x, grid, 3, analytic_grad) * w)


class BsplineVariantsTest(chex.TestCase):
  """The custom VJP (analytic derivative) and the 0/0 = 0 convention, eagerly and under jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_custom_gradient_equals_autodiff_and_finite_differences(self):
    order = 3
    grid = kan.uniform_grid(2, 5, order)
    x = jnp.asarray(np.random.default_rng(1).uniform(-0.95, 0.95, (64, 2)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5 + order)), jnp.float32)
    grad = self.variant(jax.grad(_weighted_basis_sum), static_argnums=3)
    g_fast, g_auto = grad(x, grid, w, True), grad(x, grid, w, False)
    chex.assert_trees_all_close(g_fast, g_auto, rtol=1e-4, atol=1e-5)
    deriv = self.variant(kan.bspline_basis_derivative, static_argnums=2)(x, grid, order)
    basis = self.variant(kan.bspline_basis, static_argnums=2)
    eps = 1e-3
    fd = (basis(x + eps, grid, order) - basis(x - eps, grid, order)) / (2 * eps)
    chex.assert_trees_all_close(deriv, fd, rtol=1e-7, atol=2e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_repeated_knots_give_no_nan(self):
    grid = jnp.asarray([[-1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    x = jnp.asarray([[-1.0], [-0.5], [0.0], [0.5], [0.999]])
    basis = self.variant(kan.bspline_basis, static_argnums=2)(x, grid, 3)
    grads = self.variant(jax.grad(_weighted_basis_sum), static_argnums=3)(x, grid, 1.0, True)
    chex.assert_tree_all_finite((basis, grads))
    # clamped knots: unity everywhere
    chex.assert_trees_all_close(basis.sum(-1), 1.0, rtol=1e-7, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matmul_form_equals_per_edge_form_and_a_naive_loop(self):
    rng = np.random.default_rng(3)
    n, i, o, g, k = 16, 3, 4, 5, 3
    x = jnp.asarray(rng.uniform(-1, 1, (n, i)), jnp.float32)
    grid = kan.uniform_grid(i, g, k)
    coef = jnp.asarray(rng.normal(size=(i, o, g + k)), jnp.float32)
    w_b = jnp.asarray(rng.normal(size=(i, o)), jnp.float32)
    w_s = jnp.asarray(rng.normal(size=(i, o)), jnp.float32)
    basis = self.variant(kan.bspline_basis, static_argnums=2)(x, grid, k)
    y = self.variant(kan.kan_matmul)(x, basis, coef, w_b, w_s)
    phi = self.variant(kan.kan_edges)(x, basis, coef, w_b, w_s)
    chex.assert_shape([y, phi], [(n, o), (n, o, i)])
    chex.assert_trees_all_close(phi.sum(-1), y, rtol=1e-5, atol=1e-5)
    xs, bs = np.asarray(x, np.float64), np.asarray(basis, np.float64)
    silu = xs / (1 + np.exp(-xs))
    ref = np.zeros((n, o))
    for a in range(o):
      for b in range(i):
        ref[:, a] += w_b[b, a] * silu[:, b] + w_s[b, a] * bs[:, b] @ np.asarray(coef[b, a])
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_shape_contracts_are_checked_while_tracing(self):
    x, grid = jnp.zeros((4, 2)), kan.uniform_grid(2, 5, 3)
    basis = jnp.zeros((4, 2, 8))  # (N, I, G + k) of `bspline_basis`
    coef, w = jnp.zeros((2, 3, 8)), jnp.zeros((2, 3))
    with pytest.raises(AssertionError, match=r"\[bspline_planes: x_NxI\]"):
      self.variant(kan.bspline_planes, static_argnums=2)(x[0], grid, 3)
    matmul = self.variant(kan.kan_matmul)
    with pytest.raises(AssertionError, match=r"\[kan_matmul: basis_NxIxJ\]"):
      matmul(x, basis[:3], coef, w, w)
    with pytest.raises(AssertionError, match=r"\[kan_matmul: coef_IxOxJ\]"):
      matmul(x, basis, coef[..., :7], w, w)
    with pytest.raises(AssertionError, match=r"\[kan_edges: w_base_IxO, w_spline_IxO\]"):
      self.variant(kan.kan_edges)(x, basis, coef, w, w[:, :2])
    with pytest.raises(AssertionError, match=r"\[kan_matmul_planes: basis_NxJxI\]"):
      self.variant(kan.kan_matmul_planes)(x, basis, coef, w, w)  # (N, I, J) is not planes
    with pytest.raises(AssertionError, match=r"\[solve_least_squares\]"):
      self.variant(kan.solve_least_squares)(jnp.zeros((2, 5, 3)), jnp.zeros((2, 4, 1)))
    with pytest.raises(AssertionError, match=r"\[spline_values: coef_IxOxJ\]"):
      self.variant(kan.spline_values, static_argnums=3)(x, grid, coef[..., :7], 3)


def test_rbf_and_chebyshev_bases():
  x = jnp.asarray([[0.3, -0.7]])
  centres = jnp.linspace(-1.0, 1.0, 5)
  chex.assert_trees_all_close(kan.rbf_basis(x, centres, 0.5)[0, 0],
                              np.exp(-((0.3 - np.linspace(-1, 1, 5)) / 0.5) ** 2), rtol=1e-6)
  u = np.tanh(np.asarray(x))
  cheb = np.polynomial.chebyshev.chebvander(u, 4)
  chex.assert_trees_all_close(kan.chebyshev_basis(x, 4), cheb, rtol=1e-5, atol=1e-6)


def test_bad_grid_shapes_are_refused():
  with pytest.raises(ValueError, match=r"grid must be \(I=2"):
    kan.bspline_basis(jnp.zeros((4, 2)), kan.uniform_grid(3, 5, 3), 3)
  with pytest.raises(ValueError, match="grid_size >= 1"):
    kan.uniform_grid(2, 0, 3)
  with pytest.raises(ValueError, match="degree >= 0"):
    kan.chebyshev_basis(jnp.zeros((4, 2)), -1)


def test_grid_from_samples_can_span_the_domain():
  x = jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.8, (200, 2)))
  order, size = 3, 8
  hull = kan.grid_from_samples(x, size, order)
  spanned = kan.grid_from_samples(x, size, order, span=(-1.0, 1.0))
  chex.assert_shape([hull, spanned], (2, size + 2 * order + 1))
  chex.assert_trees_all_close(hull[:, order], x.min(0), rtol=1e-6)  # pykan's: the samples' hull
  chex.assert_trees_all_close(spanned[:, order], -1.0, rtol=1e-6)
  chex.assert_trees_all_close(spanned[:, order + size], 1.0, rtol=1e-6)
  assert np.all(np.diff(np.asarray(spanned), axis=1) > 0)
  # every basis function still sums to one over the whole domain
  u = jnp.tile(jnp.linspace(-1.0, 0.999, 50)[:, None], (1, 2))
  chex.assert_trees_all_close(kan.bspline_basis(u, spanned, order).sum(-1), 1.0, rtol=1e-7,
                              atol=1e-5)

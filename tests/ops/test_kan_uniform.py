"""Closed-form uniform-grid B-spline bases against the Cox-de Boor recursion and scipy, their
custom-VJP gradients against autodiff through the recursion, and the layer's static choice of
path (the grid collection's `uniform` marker: kept by init and pruning, dropped by grid updates)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import BSpline

from jaxtricks.layers.kan import KANLayer
from jaxtricks.models.kan import KAN, init_variables, refine
from jaxtricks.models.kan_prune import prune
from jaxtricks.ops import kan, kan_uniform

RNG = np.random.default_rng(0)


def _off_knots(n: int, n_in: int, grid: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Samples over [lo, hi] (beyond the knots too) kept 1e-4 away from every knot: at a knot a
  step (order 0) or a kink's derivative (order 1) depends on how x rounds."""
  x = RNG.uniform(lo, hi, (n, n_in))
  for i in range(n_in):
    near = np.abs(x[:, i, None] - grid[i][None]).min(1) < 1e-4
    x[near, i] += 3e-4
  return x.astype(np.float32)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("grid_size", [1, 5])
def test_closed_form_equals_the_recursion_and_scipy(order, grid_size):
  grid = kan.uniform_grid(3, grid_size, order, -1.3, 2.0)
  x = _off_knots(2000, 3, np.asarray(grid), -3.5, 4.0)
  closed = np.asarray(kan_uniform.uniform_planes(jnp.asarray(x), grid, order))
  recursion = np.asarray(kan.bspline_planes(jnp.asarray(x), grid, order))
  chex.assert_shape(closed, (2000, grid_size + order, 3))
  chex.assert_trees_all_close(closed, recursion, atol=1e-6, rtol=0)
  for i in range(3):  # float64 scipy on the float32 knots, inside its base interval [lo, hi)
    knots = np.asarray(grid[i], np.float64)
    inside = (x[:, i] >= knots[order]) & (x[:, i] < knots[-order - 1])
    for j in range(grid_size + order):
      c = np.zeros(grid_size + order)
      c[j] = 1.0
      ref = BSpline(knots, c, order, extrapolate=False)(x[inside, i].astype(np.float64))
      chex.assert_trees_all_close(closed[inside, j, i], ref, atol=1e-6, rtol=0)


def _features_by_recursion(x, grid, order):
  planes = kan.bspline_planes(x, grid, order, analytic_grad=False)
  return jnp.concatenate([planes, jax.nn.silu(x)[:, None]], axis=1)


@pytest.mark.parametrize(("order", "jit"), [(1, True), (2, False), (3, True), (5, False)])
def test_features_and_their_gradient_equal_autodiff_through_the_recursion(order, jit):
  grid = kan.uniform_grid(4, 5, order, -2.0, 1.0)
  x = jnp.asarray(_off_knots(256, 4, np.asarray(grid), -3.5, 2.5))
  w = jnp.asarray(RNG.normal(size=(256, 5 + order + 1, 4)), jnp.float32)
  variant = (lambda f, **kw: jax.jit(f, **kw)) if jit else (lambda f, **kw: f)
  closed = variant(kan_uniform.uniform_features, static_argnums=2)(x, grid, order)
  chex.assert_trees_all_close(closed, _features_by_recursion(x, grid, order), atol=1e-6)
  loss = lambda f: lambda x: jnp.sum(f(x, grid, order) * w)
  g_closed = variant(jax.grad(loss(kan_uniform.uniform_features)))(x)
  g_auto = jax.grad(loss(_features_by_recursion))(x)
  chex.assert_trees_all_close(g_closed, g_auto, rtol=1e-5, atol=2e-5)
  # and against central differences of the closed form itself (float64)
  with jax.enable_x64():
    x64, grid64, w64 = (a.astype(jnp.float64) for a in (x, grid, w))
    f64 = lambda x: jnp.sum(kan_uniform.uniform_features(x, grid64, order) * w64, axis=(1, 2))
    eps = 1e-6
    fd = jnp.stack([(f64(x64.at[:, i].add(eps)) - f64(x64.at[:, i].add(-eps))) / (2 * eps)
                    for i in range(4)], axis=1)
    chex.assert_trees_all_close(jax.grad(lambda x: f64(x).sum())(x64), fd, rtol=1e-6,
                                atol=1e-6)

def test_knots_get_no_gradient_and_bad_grids_are_refused():
  grid = kan.uniform_grid(2, 5, 3)
  x = jnp.zeros((4, 2))
  g = jax.grad(lambda t: jnp.sum(kan_uniform.uniform_planes(x, t, 3)))(grid)
  assert float(jnp.abs(g).max()) == 0.0
  with pytest.raises(ValueError, match="grid must be"):
    kan_uniform.uniform_planes(x, grid[:, :4], 3)
  with pytest.raises(AssertionError, match=r"\[uniform_features: grid_IxM\]"):
    kan_uniform.uniform_features(x, kan.uniform_grid(3, 5, 3), 3)


def _layer_value_and_grads(layer, variables, x):
  def loss(params, x):
    y = layer.apply({**variables, "params": params}, x)
    return jnp.sum(y * jnp.cos(y))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)


@pytest.mark.parametrize("with_grid_collection", [True, False])
def test_layer_closed_form_equals_the_recursion(with_grid_collection):
  x = jnp.asarray(RNG.uniform(-1.2, 1.2, (64, 6)), jnp.float32)
  fast, slow = KANLayer(5), KANLayer(5, closed_form=False)
  variables = nn.unbox(fast.init(jax.random.key(0), x))
  assert bool(variables["grid"]["uniform"])
  if not with_grid_collection:
    variables = {"params": variables["params"]}
  (v_fast, g_fast), (v_slow, g_slow) = (_layer_value_and_grads(m, variables, x)
                                        for m in (fast, slow))
  chex.assert_trees_all_close(v_fast, v_slow, rtol=1e-5)
  chex.assert_trees_all_close(g_fast, g_slow, rtol=1e-4, atol=1e-6)


def test_grid_updates_drop_the_marker_and_pruning_keeps_it():
  model = KAN((2, 3, 1), grid_size=4)
  variables = init_variables(model, jax.random.key(1))
  x = jnp.asarray(RNG.uniform(-1, 1, (128, 2)), jnp.float32)
  assert all("uniform" in g for g in variables["grid"].values())
  small, small_vars, _ = prune(model, variables, x, keep_inputs=[0])
  assert all("uniform" in g for g in small_vars["grid"].values())
  new_model, new_vars = refine(model, variables, x)
  assert not any("uniform" in g for g in new_vars["grid"].values())
  # The moved knots are not uniform: the recursion must serve them, which closed_form=False
  # forces; both give the same answer, so the layer took the recursion.
  recursion = new_model.clone(closed_form=False)
  chex.assert_trees_all_close(new_model.apply(new_vars, x), recursion.apply(new_vars, x),
                              rtol=1e-6, atol=1e-6)
  # Sanity of that argument: the closed form on these knots would be wrong.
  knots = new_vars["grid"]["layer_0"]["knots"]
  wrong = kan_uniform.uniform_planes(x, knots, 3) - kan.bspline_planes(x, knots, 3)
  assert float(jnp.abs(wrong).max()) > 1e-3

"""KAN layer and network: both forms agree, grid updates and extension keep the function, the
least-squares refit never returns NaN, and full-batch training fits a smooth function."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lm
from jaxtricks.config import override
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.kan import KANLayer, KANMLPConfig, n_basis
from jaxtricks.models.kan import KAN, init_variables, mse, refine
from jaxtricks.models.kan_prune import (
  Regularizer,
  attribution,
  edge_l1,
  l1_and_entropy,
  prune,
  prune_edges,
)
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops import kan
from jaxtricks.train.kan_fit import fit
from jaxtricks.train.losses import LOSSES

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.uniform(-1, 1, (256, 2)), jnp.float32)
Y = jnp.exp(jnp.sin(jnp.pi * X[:, :1]) + X[:, 1:] ** 2)


@pytest.mark.parametrize("basis", ["bspline", "rbf", "chebyshev"])
@pytest.mark.parametrize("init_style", ["pykan", "efficient"])
def test_layer_outputs_equal_the_sum_of_its_edges(basis, init_style):
  layer = KANLayer(3, grid_size=4, basis=basis, init_style=init_style)
  x = jnp.asarray(RNG.uniform(-1, 1, (5, 7, 2)), jnp.float32)
  variables = nn.unbox(layer.init(jax.random.key(0), x))
  y, phi = layer.apply(variables, x, return_edges=True)
  chex.assert_shape([y, phi], [(5, 7, 3), (35, 3, 2)])
  chex.assert_trees_all_close(phi.sum(-1).reshape(5, 7, 3), y, rtol=1e-5, atol=1e-6)
  p = variables["params"]
  j = n_basis(basis, 4, 3)
  chex.assert_shape([p["coef"], p["w_base"], p["w_spline"]], [(2, 3, j), (2, 3), (2, 3)])
  if basis == "bspline":  # the knots sit in their own collection, uniform at init
    chex.assert_trees_all_close(variables["grid"]["knots"], kan.uniform_grid(2, 4, 3),
                                rtol=1e-7, atol=1e-6)
    params_only = layer.apply({"params": p}, x)
    chex.assert_trees_all_close(params_only, y, rtol=1e-6)


def test_bad_layer_options_are_refused():
  with pytest.raises(ValueError, match="basis must be one of"):
    KANLayer(2, basis="fourier").init(jax.random.key(0), jnp.zeros((1, 2)))
  with pytest.raises(ValueError, match=r"KAN\[2, 1\] takes 2 inputs, got 3"):
    KAN((2, 1)).init(jax.random.key(0), jnp.zeros((1, 3)))


@pytest.fixture(scope="module")
def trained():
  model = KAN((2, 1, 1), grid_size=3)
  variables = init_variables(model, jax.random.key(0))
  variables, losses = fit(model, variables, X, Y, 60)
  return model, variables, losses


def test_lbfgs_fits_the_function(trained):
  _, _, losses = trained
  chex.assert_shape(losses, (60,))
  assert float(losses[-1]) < 0.05 * float(losses[0])


def test_iters_per_step_counts_pykan_steps():
  model = KAN((2, 1, 1), grid_size=3)
  variables = init_variables(model, jax.random.key(0))
  _, losses = fit(model, variables, X, Y, 3, iters_per_step=4, update_grid_every=1,
                  update_grid_until=2)
  chex.assert_shape(losses, (12,))
  assert float(losses[-1]) < float(losses[0])
  with pytest.raises(ValueError, match="iters_per_step"):
    fit(model, variables, X, Y, 3, iters_per_step=0)


def test_adam_lowers_the_loss():
  model = KAN((2, 2, 1), grid_size=3, init_style="efficient")
  variables = init_variables(model, jax.random.key(1))
  _, losses = fit(model, variables, X, Y, 40, optimizer="adam", lr=3e-2)
  assert float(losses[-1]) < 0.5 * float(losses[0])


@pytest.mark.parametrize("grid_size", [3, 10])
def test_grid_update_and_extension_keep_the_function(trained, grid_size):
  model, variables, _ = trained
  new_model, new_vars = refine(model, variables, X, grid_size=grid_size)
  assert new_model.grid_size == grid_size
  chex.assert_shape(new_vars["params"]["layer_0"]["coef"], (2, 1, grid_size + 3))
  chex.assert_shape(new_vars["grid"]["layer_1"]["knots"], (1, grid_size + 7))
  before = model.apply(variables, X)
  after = new_model.apply(new_vars, X)
  # The refit is least squares on the samples; going finer it is nearly exact, while moving a
  # coarse grid to the samples' quantiles changes the curve a little (outputs are 1..7).
  tol = 8e-2 if grid_size == 3 else 5e-3
  assert float(jnp.sqrt(jnp.mean(jnp.square(after - before)))) < tol
  assert float(mse(new_model, new_vars, X, Y)) < float(mse(model, variables, X, Y)) + tol ** 2


@pytest.mark.parametrize("case", ["repeated values", "one sample per interval", "outliers",
                                  "all equal"])
def test_refit_never_returns_nan(trained, case):
  model, variables, _ = trained
  x = {"repeated values": jnp.repeat(X[:8], 32, axis=0),
       "one sample per interval": X[:4],
       "outliers": X.at[:3].set(jnp.asarray([[1e4, -1e4], [-1e3, 5e3], [0.0, 1e5]])),
       "all equal": jnp.zeros((64, 2))}[case]
  new_model, new_vars = refine(model, variables, x, grid_size=5)
  chex.assert_tree_all_finite(new_vars, custom_message=case)
  chex.assert_tree_all_finite(new_model.apply(new_vars, X))


def test_least_squares_against_numpy_and_rank_deficient():
  a = RNG.normal(size=(3, 40, 6))
  y = RNG.normal(size=(3, 40, 2))
  c = kan.solve_least_squares(jnp.asarray(a), jnp.asarray(y), ridge=0.0)
  for b in range(3):
    ref = np.linalg.lstsq(a[b], y[b], rcond=None)[0]
    chex.assert_trees_all_close(c[b], ref, rtol=1e-3, atol=1e-4)
  singular = jnp.zeros((1, 10, 4))
  chex.assert_tree_all_finite(kan.solve_least_squares(singular, jnp.ones((1, 10, 1))))


def test_refine_needs_bsplines(trained):
  model, variables, _ = trained
  with pytest.raises(ValueError, match="grid updates need the B-spline basis"):
    refine(dataclasses.replace(model, basis="rbf"), variables, X)


@pytest.mark.slow  # the slow tier: a long training run
def test_kan_feed_forward_in_the_transformer_trains():
  """The `--exp=lm --preset=kan` model, shrunk: KAN blocks build, and SGD lowers the loss."""
  preset = lm.get_config("kan")
  preset.validate()
  assert preset.model.mlp.kind == "kan" and preset.model.mlp.d_ff == 64
  cfg = override(preset.model, {"vocab_size": 32, "d_model": 32, "n_layers": 2,
                                "mlp.d_ff": 16, "mlp.grid": 4})
  model = Transformer(cfg)
  tokens = jnp.asarray(RNG.integers(0, 32, (4, 17)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  params = nn.unbox(model.init(jax.random.key(0), batch["inputs"])["params"])
  chex.assert_shape(params["block_0"]["mlp"]["up"]["coef"], (32, 16, 4 + 3))
  loss = jax.jit(jax.value_and_grad(lambda p: LOSSES["lm"](model, p, batch)[0]))
  first, _ = loss(params)
  for _ in range(5):
    value, grads = loss(params)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  chex.assert_tree_all_finite(value)
  assert float(loss(params)[0]) < float(first)


def _with_dead_hidden_nodes(model, variables, dead):
  """Zeroes every edge into and out of the given hidden nodes of a [2, H, 1] KAN."""
  p = jax.tree.map(lambda a: a, variables["params"])
  for key in ("w_base", "w_spline"):
    p["layer_0"][key] = p["layer_0"][key].at[:, dead].set(0.0)
    p["layer_1"][key] = p["layer_1"][key].at[dead, :].set(0.0)
  return {"params": p, "grid": variables["grid"]}


def test_prune_removes_dead_nodes_and_keeps_the_function():
  model = KAN((2, 5, 1), grid_size=4)
  variables = _with_dead_hidden_nodes(model, init_variables(model, jax.random.key(2)), [1, 3, 4])
  small, small_vars, kept = prune(model, variables, X)
  assert small.widths == (2, 2, 1) and kept[1] == [0, 2]
  chex.assert_trees_all_close(small.apply(small_vars, X), model.apply(variables, X), rtol=1e-5,
                              atol=1e-6)
  one_input, vars_1, _ = prune(model, variables, X, keep_inputs=[0])
  assert one_input.widths[0] == 1
  chex.assert_axis_dimension(vars_1["grid"]["layer_0"]["knots"], 0, 1)


def test_prune_with_edge_threshold_drops_a_weak_node():
  model = KAN((2, 5, 1), grid_size=4)
  variables = _with_dead_hidden_nodes(model, init_variables(model, jax.random.key(2)), [1, 3, 4])
  nodes, edges = attribution(model, variables, X)
  scores = nodes[1]
  weak = int(np.argmin(np.where(scores > 1e-6, scores, np.inf)))  # the weaker live node
  threshold = float(scores[weak]) * 1.01
  assert threshold < float(scores.max())
  small, small_vars, kept = prune(model, variables, X, node_threshold=1e-6,
                                  edge_threshold=threshold)
  assert small.widths == (2, 1, 1) and kept[1] == [int(np.argmax(scores))]
  # the result equals the full network with every edge scoring <= threshold switched off
  grid = {name: dict(g, mask=jnp.asarray((e > threshold).T, jnp.float32))
          for (name, g), e in zip(sorted(variables["grid"].items()), edges, strict=True)}
  chex.assert_trees_all_close(small.apply(small_vars, X),
                              model.apply({"params": variables["params"], "grid": grid}, X),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the slow tier: a long training run
def test_regularisation_and_attribution():
  model = KAN((2, 5, 1), grid_size=4)
  variables = _with_dead_hidden_nodes(model, init_variables(model, jax.random.key(2)), [1, 3, 4])
  for form, entropy in [("sample", "paper"), ("std", "paper"), ("coef", "paper"),
                        ("std", "pykan")]:
    reg = Regularizer(model, lamb=1.0, form=form, entropy=entropy)
    value = reg(variables["params"], variables["grid"], X)
    grads = jax.grad(reg)(variables["params"], variables["grid"], X)
    assert float(value) > 0
    chex.assert_tree_all_finite(grads)
  # pykan's entropy: a layer with one edge per node has none; spreading a node's mass adds some
  one_hot, spread = jnp.eye(2), jnp.full((2, 2), 0.5)
  ent = lambda a: float(l1_and_entropy([a], "pykan")[1])
  assert ent(spread) > ent(one_hot) + 0.1
  nodes, edges = attribution(model, variables, X)
  assert [len(s) for s in nodes] == [2, 5, 1]
  chex.assert_shape(edges[0], (5, 2))
  assert np.all(nodes[1][[1, 3, 4]] < 1e-6) and np.all(nodes[1][[0, 2]] > 1e-3)
  # Regularised training shrinks the edges' total magnitude.
  l1 = lambda v: float(sum(jnp.sum(a) for a in edge_l1(model, v, X)))
  trained, _ = fit(model, variables, X, Y, 30, optimizer="adam", lr=1e-2,
                   reg=Regularizer(model, lamb=1.0, form="coef"))
  plain, _ = fit(model, variables, X, Y, 30, optimizer="adam", lr=1e-2)
  assert l1(trained) < l1(plain)


def test_prune_edges_masks_small_edges_for_good():
  model = KAN((2, 5, 1), grid_size=4)
  variables = _with_dead_hidden_nodes(model, init_variables(model, jax.random.key(2)), [1, 3, 4])
  masked = prune_edges(model, variables, X, edge_threshold=1e-6)  # only the dead edges
  chex.assert_shape(masked["grid"]["layer_0"]["mask"], (2, 5))
  assert float(masked["grid"]["layer_0"]["mask"][:, 1].sum()) == 0.0
  chex.assert_trees_all_close(model.apply(masked, X), model.apply(variables, X), rtol=1e-7,
                              atol=1e-6)
  trained, _ = fit(model, masked, X, Y, 5, optimizer="adam", lr=1e-1)
  _, edges = attribution(model, trained, X)
  assert np.all(edges[0][1] == 0.0)  # a masked edge stays off through training


def test_kan_blocks_regulariser_is_a_loss_term():
  """--model.mlp.reg_lamb adds lamb (L1 + reg_entropy entropy) of the blocks' coefficient-form
  edge magnitudes to the objective (numpy reference); `loss` stays the data term."""
  cfg = override(kan_lm_config(), {"mlp.reg_lamb": 1e-3, "mlp.reg_entropy": 2.0})
  plain = override(cfg, {"mlp.reg_lamb": 0.0})
  model, plain_model = Transformer(cfg), Transformer(plain)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"])
  value_and_grad = lambda m: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p: LOSSES["lm"](m, p, batch), has_aux=True))
  (objective, metrics), grads = value_and_grad(model)(params)
  (data, plain_metrics), plain_grads = value_and_grad(plain_model)(params)
  assert "kan_reg" not in plain_metrics and "objective" not in plain_metrics
  chex.assert_trees_all_close(metrics["loss"], data, rtol=1e-6)
  l1, entropy = 0.0, 0.0
  for name in ("block_0", "block_1"):
    for layer in ("up", "down"):
      p = {k: np.asarray(v, np.float64) for k, v in params[name]["mlp"][layer].items()}
      mag = (np.abs(p["w_spline"]) * np.abs(p["coef"]).mean(-1) + np.abs(p["w_base"])).T
      l1 += mag.sum()
      for axis in (1, 0):
        share = mag / (mag.sum(axis=axis, keepdims=True) + 1.0)
        entropy -= np.mean(np.sum(share * np.log2(share + 1e-4), axis=axis))
  expected = 1e-3 * (l1 + 2.0 * entropy)
  chex.assert_trees_all_close(metrics["kan_reg"], expected, rtol=1e-5)
  chex.assert_trees_all_close(objective, data + expected, rtol=1e-5)
  chex.assert_trees_all_close(metrics["objective"], objective, rtol=1e-6)
  assert not np.allclose(grads["block_0"]["mlp"]["up"]["coef"],
                         plain_grads["block_0"]["mlp"]["up"]["coef"])
  chex.assert_trees_all_close(grads["embed"]["embedding"], plain_grads["embed"]["embedding"],
                              rtol=1e-6, atol=1e-9)


def kan_lm_config():
  return ModelConfig(vocab_size=32, d_model=16, n_layers=2, attention=AttentionConfig(n_heads=2),
                     mlp=KANMLPConfig(d_ff=8, grid=3))

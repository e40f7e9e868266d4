"""SLoPe in the Transformer: static masks through training, kept-only optimizer state, lazy
adapters (no change at the switch, exact parameter count, merged for inference), compressed
parameters, SR-STE, and config errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxtricks import sharding
from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.nm_projection import SlopeProjection
from jaxtricks.layers.sparse_linear import NMSpec, SparseLinear, col_positions
from jaxtricks.models import sparse
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops import sparsity as ops_sparsity
from jaxtricks.train import step as step_lib
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.losses import LOSSES
from jaxtricks.train.optimizer import lr_schedule, make_optimizer
from jaxtricks.train.sparse_optimizer import adapter_start_step, recorded_positions
from jaxtricks.train.state import init_state, state_shardings

BASE = ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=2),
                   projection=SlopeProjection())


def with_projection(cfg: ModelConfig, **fields) -> ModelConfig:
  return override(cfg, {f"projection.{k}": v for k, v in fields.items()})
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)


@functools.cache
def init_params(config, seed=0):
  init = jax.jit(Transformer(config).init)
  return jax.device_get(nn.unbox(init(jax.random.key(seed), TOKENS)["params"]))


def logits(config, params):
  return jax.jit(Transformer(config).apply)({"params": params}, TOKENS)


def flat(params):
  return traverse_util.flatten_dict(jax.device_get(params))


def test_slope_kernels_are_pruned_and_found():
  params = init_params(BASE)
  leaves = sparse.nm_leaves(Transformer(BASE))
  # q, k, v, o, gate, up, down in each of the 2 blocks; embedding and head stay dense
  assert len(leaves) == 14 and all(p[0].startswith("block_") for p in leaves)
  for path, leaf in leaves.items():
    w = flat(params)[path]
    w_IxO = w.reshape(int(np.prod(w.shape[:leaf.axis + 1])), -1)
    groups = (w_IxO != 0).reshape(-1, 4, w_IxO.shape[1]).sum(1)
    assert (groups == 2).all(), path


def test_adapters_change_nothing_at_the_switch_and_add_exact_parameters():
  r = 4
  with_adapters = with_projection(BASE, adapter_rank=r)
  p0, p1 = init_params(BASE), init_params(with_adapters)
  f0, f1 = flat(p0), flat(p1)
  added = {k: v for k, v in f1.items() if k not in f0}
  assert all(k[-1] in ("adapter_l", "adapter_r") for k in added)
  leaves = sparse.nm_leaves(Transformer(BASE))
  expected = 0
  for path in leaves:
    w = f0[path]
    leaf = leaves[path]
    d_in = int(np.prod(w.shape[:leaf.axis + 1]))
    expected += (d_in + w.size // d_in) * r
  assert sum(v.size for v in added.values()) == expected
  # same kernels, L as drawn at the switch, R = 0: the same logits
  f1.update(f0)
  rng = np.random.default_rng(0)
  for k in added:
    if k[-1] == "adapter_l":
      f1[k] = rng.standard_normal(f1[k].shape).astype(np.float32)
  np.testing.assert_array_equal(logits(with_adapters, traverse_util.unflatten_dict(f1)),
                                logits(BASE, p0))


@pytest.mark.parametrize("rescale", [False, True])
def test_merged_adapters_give_a_dense_model_with_the_same_outputs(rescale):
  cfg = with_projection(BASE, adapter_rank=2, rescale=rescale)
  f = flat(init_params(cfg))
  rng = np.random.default_rng(1)
  for k in f:
    if k[-1] in ("adapter_l", "adapter_r"):
      f[k] = rng.standard_normal(f[k].shape).astype(np.float32) * 0.1
  params = traverse_util.unflatten_dict(f)
  leaves = sparse.nm_leaves(Transformer(cfg))
  merged = sparse.merged_params(params, leaves, sparse.spec_of_path(cfg))
  dense = override(cfg, {"projection": "dense"})
  np.testing.assert_allclose(logits(dense, merged), logits(cfg, params), rtol=2e-5, atol=2e-5)


def test_compressed_parameters_round_trip_to_the_same_outputs():
  params = init_params(BASE)
  leaves = sparse.nm_leaves(Transformer(BASE))
  packed = sparse.compress_params(params, leaves)
  assert sparse.tree_bytes(packed) < sparse.tree_bytes(params)
  np.testing.assert_array_equal(logits(BASE, sparse.decompress_params(packed)),
                                logits(BASE, params))


def _train(config, steps, seed=0):
  tc = TrainConfig(steps=steps, batch_size=2, seq_len=11, warmup_steps=1, lr=1e-2)
  model = Transformer(config)
  tx = make_optimizer(tc, model)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  _, shardings = state_shardings(model, tx, tc.seq_len, mesh)
  state = init_state(model, tx, tc.seq_len, seed, shardings)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, LOSSES["lm"], lr_schedule(tc)), shardings, mesh)
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:]}
  states = [jax.device_get(state)]
  for _ in range(steps):
    state, _ = step(state, batch)
    states.append(jax.device_get(state))
  return states, model, tc


def test_slope_training_keeps_static_masks_and_starts_adapters_late():
  cfg = with_projection(BASE, adapter_rank=2, adapter_start=0.5)
  states, model, tc = _train(cfg, 4)
  start = adapter_start_step(tc.steps, cfg.projection)
  assert start == 2
  leaves = sparse.nm_leaves(model)
  first, last = flat(states[0].params), flat(states[-1].params)
  for path in leaves:
    assert ((first[path] == 0) == (last[path] == 0)).all(), path  # pruned stay exactly zero
    assert not np.array_equal(first[path], last[path]), path      # kept ones learn
  assert sparse.static_masks_held(states[-1].params, states[-1].opt_state.positions, leaves)
  moved = flat(states[-1].params)
  moved[path] = np.roll(moved[path], 1, axis=0)  # a different mask is detected
  assert not sparse.static_masks_held(traverse_util.unflatten_dict(moved),
                                      states[-1].opt_state.positions, leaves)
  r_paths = [k for k in first if k[-1] == "adapter_r"]
  l_paths = [k for k in first if k[-1] == "adapter_l"]
  for i, s in enumerate(states):
    r_norm = sum(np.abs(flat(s.params)[k]).sum() for k in r_paths)
    l_norm = sum(np.abs(flat(s.params)[k]).sum() for k in l_paths)
    assert (l_norm > 0) == (i >= start), (i, l_norm)  # L is drawn for the switch step
    assert (r_norm > 0) == (i > start), (i, r_norm)  # R moves only after the switch step
  l_draw = flat(states[start].params)[l_paths[0]]
  assert 0.5 < l_draw.std() * np.sqrt(l_draw.shape[0]) < 1.5  # N(0, 1/I)
  # Adam's moments of a sparse kernel hold its kept values only
  path = next(iter(leaves))
  moments = [leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(states[-1].opt_state)[0]
             if tuple(k.key for k in kp if hasattr(k, "key"))[-len(path):] == path]
  assert len(moments) == 3  # packed positions, mu, nu
  assert sorted(m.size for m in moments)[1:] == [first[path].size // 2] * 2


def test_srste_keeps_dense_weights_and_uses_half():
  cfg = override(BASE, {"projection": "srste"})
  states, model, _ = _train(cfg, 2)
  leaves = sparse.nm_leaves(model)
  params = states[-1].params
  for path in leaves:
    w = flat(params)[path]
    assert np.count_nonzero(w) == w.size  # stored dense, re-masked every step
  dense_count = sum(flat(params)[p].size for p in leaves)
  assert sparse.nonzero_params(params, leaves) == (
      sum(v.size for v in flat(params).values()) - dense_count // 2)


def test_mixed_nm_per_block():
  cfg = with_projection(BASE, blocks=("dense", "1:4"))
  leaves = sparse.nm_leaves(Transformer(cfg))
  assert {p[0] for p in leaves} == {"block_1"}
  assert {(leaf.n, leaf.m) for leaf in leaves.values()} == {(1, 4)}
  f = flat(init_params(cfg))
  w = f[("block_1", "mlp", "up", "kernel")]
  assert np.count_nonzero(w) == w.size // 4


@pytest.mark.parametrize("changes,message", [
    ({"projection.n": 5, "projection.m": 4}, "0 < N <= M"),
    ({"projection.m": 3, "projection.n": 1}, "not divisible by the N:M group size"),
    ({"projection.blocks": ("2:4",)}, "entries for 2 blocks"),
    ({"projection.blocks": ("2:4", "two")}, "is not 'N:M' or 'dense'"),
    ({"projection.targets": ("attn", "embed")}, "model.projection.targets"),
    ({"mlp": "kan"}, "no linear projections"),
    ({"projection.adapter_start": 1.5}, "model.projection.adapter_start"),
    ({"projection.mask_change_freq": 0}, "model.projection.mask_change_freq"),
])
def test_sparsity_config_errors(changes, message):
  with pytest.raises(ConfigError, match=message):
    override(BASE, changes).validate()


def test_mask_change_freq_holds_the_transposed_mask_between_refreshes():
  cfg = with_projection(BASE, mask_change_freq=2)
  states, model, _ = _train(cfg, 4)
  leaves = sparse.nm_leaves(model)
  path = ("block_0", "mlp", "up", "kernel")
  col = (*path[:-1], "col_positions")
  held = [flat(s.params)[col] for s in states]
  fresh = [np.asarray(col_positions(flat(s.params)[path].reshape(32, -1), 2, 4)) for s in states]
  np.testing.assert_array_equal(held[0], fresh[0])  # C of the initial weights
  np.testing.assert_array_equal(held[1], held[0])   # held after step 1 (learning rate 0)
  np.testing.assert_array_equal(held[2], fresh[2])  # refreshed after step 2
  np.testing.assert_array_equal(held[3], held[2])   # held after step 3 ...
  assert not np.array_equal(fresh[3], fresh[2])     # ... although the weights' own C moved
  np.testing.assert_array_equal(held[4], fresh[4])
  assert sparse.static_masks_held(states[-1].params,
                                  recorded_positions(states[-1].opt_state), leaves)


def test_held_transposed_mask_is_what_the_input_gradient_uses():
  spec = NMSpec(2, 4, mask_change_freq=5)
  layer = SparseLinear((8,), ("embed", "mlp"), spec=spec)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 16)), jnp.float32)
  params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  w = params["kernel"] * 1.7 + 0.01 * (params["kernel"] != 0)  # weights moved, C held
  params = dict(params, kernel=w)
  dx = jax.grad(lambda x: layer.apply({"params": params}, x).sum())(x)
  held = ops_sparsity.kept_mask(
      ops_sparsity.unpack_float(params["col_positions"], 2, 16 * 8 // 2).reshape(16, 2, 2),
      (16, 8), 2, 4, axis=1)
  np.testing.assert_allclose(dx, np.ones((3, 8)) @ np.asarray(jnp.where(held, w, 0)).T,
                             rtol=1e-5, atol=1e-6)

"""Frozen parameters (the seam adapters train through): a parameter that a component does not
train is held apart from the optimizer, never changes, and the trainable ones take exactly the
updates they would take in a run that trains everything."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.checkpoint import Checkpointer, abstract_with_shardings
from jaxtricks.config import Config
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.linear import DenseProjection
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.train.build import build
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.state import FrozenBaseState, TrainState, merge_trees, split_trainable

SEQ, BATCH = 16, 4
CONFIG = Config(
    model=ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=2)),
    # no clipping: with a per-leaf optimizer the trainable leaves' updates do not depend on the
    # frozen leaves' gradients
    train=TrainConfig(steps=10, batch_size=BATCH, seq_len=SEQ, warmup_steps=0, grad_clip=0.0))


def _freeze_attention(self, model, path):
  del self, model
  return "attn" not in path


@pytest.fixture(scope="module")
def runs():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(DenseProjection, "trains", _freeze_attention)
    frozen = build(CONFIG)
    frozen_state = frozen.init_state()
  full = build(CONFIG)
  rng = np.random.default_rng(0)
  window = rng.integers(0, 256, (BATCH, SEQ + 1)).astype(np.int32)
  batch = {"inputs": jnp.asarray(window[:, :-1]), "targets": jnp.asarray(window[:, 1:])}
  return frozen, frozen_state, full, full.init_state(), batch


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_split_and_merge_are_inverse():
  params = {"a": {"attn": {"kernel": 1}, "mlp": {"kernel": 2}}, "b": 3}
  model_config = type("M", (), {"trains": staticmethod(lambda path: "attn" not in path)})
  trainable, frozen = split_trainable(model_config, params)
  assert frozen == {"a": {"attn": {"kernel": 1}}}
  assert trainable == {"a": {"mlp": {"kernel": 2}}, "b": 3}
  assert merge_trees(trainable, frozen) == params


def test_frozen_parameters_have_no_optimizer_state(runs):
  _, state, _, full_state, _ = runs
  assert isinstance(state, FrozenBaseState) and type(full_state) is TrainState
  assert all("['attn']" not in k for k in _flat(state.params))
  assert all("['attn']" in k for k in _flat(state.frozen))
  chex.assert_trees_all_equal(state.model_params(), full_state.params)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  n_full = sum(x.size for x in jax.tree.leaves(full_state.params))
  moments = lambda s: sum(x.size for x in jax.tree.leaves(s.opt_state) if x.ndim)  # noqa: E731
  assert moments(state) == 2 * n_trainable < 2 * n_full == moments(full_state)


def test_a_step_trains_only_the_trainable_parameters(runs):
  built, state, full_built, full_state, batch = runs
  frozen_before = jax.device_get(state.frozen)
  new, metrics = built.train_step(jax.tree.map(jnp.copy, state), batch)
  full_new, full_metrics = full_built.train_step(jax.tree.map(jnp.copy, full_state), batch)
  chex.assert_trees_all_equal(jax.device_get(new.frozen), frozen_before)
  np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-6)
  full_flat = _flat(full_new.params)
  for key, value in _flat(new.params).items():
    np.testing.assert_allclose(value, full_flat[key], rtol=1e-5, atol=1e-7, err_msg=key)
  changed = [k for k, v in _flat(new.params).items()
             if not np.array_equal(v, _flat(state.params)[k])]
  assert changed, "no trainable parameter changed"
  assert built.eval_step(new.model_params(), batch)["loss"] < metrics["loss"]


def test_checkpoint_round_trip(runs, tmp_path):
  built, state, *_ = runs
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  try:
    ckpt.save(1, state, {"step": 1}, force=True)
    step, restored, _ = ckpt.restore_latest(
        abstract_with_shardings(built.abstract_state, built.shardings))
  finally:
    ckpt.close()
  assert step == 1 and isinstance(restored, FrozenBaseState)
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))

"""The jit train step on a fixed batch: it lowers the loss, counts steps and reports metrics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks import sharding
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train import step as step_lib
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.losses import LOSSES
from jaxtricks.train.optimizer import lr_schedule, make_optimizer
from jaxtricks.train.state import count_params, init_state, state_shardings

SEQ, BATCH = 16, 4
MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=1, attention=AttentionConfig(n_heads=2))
TRAIN = TrainConfig(steps=100, batch_size=BATCH, seq_len=SEQ, lr=3e-3, warmup_steps=0)


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh(sharding.MeshConfig())
  model = Transformer(MODEL)
  tx = make_optimizer(TRAIN)
  _, shardings = state_shardings(model, tx, SEQ, mesh)
  loss_fn = LOSSES["lm"]
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, loss_fn, lr_schedule(TRAIN)), shardings, mesh)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model, loss_fn), shardings, mesh)
  state = init_state(model, tx, SEQ, TRAIN.seed, shardings)
  text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 4, np.uint8)
  window = np.stack([text[i:i + SEQ + 1] for i in range(0, 4 * BATCH, 4)]).astype(np.int32)
  batch = {"inputs": jnp.asarray(window[:, :-1]), "targets": jnp.asarray(window[:, 1:])}
  return train_step, eval_step, state, batch


def test_initial_state(setup):
  _, eval_step, state, batch = setup
  assert int(state.step) == 0
  chex.assert_tree_all_finite(state.params)
  assert count_params(state.params) == sum(x.size for x in jax.tree.leaves(state.params))
  # A fresh byte model is close to uniform over 256 bytes.
  assert abs(eval_step(state.params, batch)["loss"] - np.log(256)) < 1.0


def test_steps_on_a_fixed_batch_lower_the_loss(setup):
  train_step, eval_step, state, batch = setup
  state = jax.tree.map(jnp.copy, state)  # the step donates its input
  before = float(eval_step(state.params, batch)["loss"])
  losses, metrics = [before], None
  for i in range(5):
    state, metrics = train_step(state, batch)
    chex.assert_tree_all_finite(metrics)
    assert int(state.step) == i + 1
    losses.append(float(eval_step(state.params, batch)["loss"]))
  assert losses[1] < losses[0], "one step did not lower the loss"
  assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
  assert losses[-1] < losses[0] - 0.5, losses
  assert float(metrics["grad_norm"]) > 0
  # metrics are those of the batch before the update; lr follows the schedule (no warm-up).
  assert float(metrics["lr"]) == pytest.approx(float(lr_schedule(TRAIN)(4)))
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0

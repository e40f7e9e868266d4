"""The loss-context seam (jaxtricks.train.hooks.loss_context / with_contexts): a component's
context is entered around every call of the run's loss (train and eval steps), with the train
flag, and leaves the loss's value unchanged."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np

from experiments import get_config
from jaxtricks.layers.norm import RMSNormConfig
from jaxtricks.train import hooks
from jaxtricks.train.build import build


def test_contexts_wrap_every_loss_call(monkeypatch):
  entered = []

  @contextlib.contextmanager
  def context(component, model, train):
    assert isinstance(component, RMSNormConfig) and model.config.norm is component
    entered.append(train)
    yield

  monkeypatch.setitem(hooks.LOSS_CONTEXTS, RMSNormConfig, context)
  built = build(get_config("lm", "smoke"))
  tc = built.config.train
  tokens = np.random.default_rng(0).integers(0, 256, (tc.batch_size, tc.seq_len + 1))
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
           "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
  state = built.init_state()
  metrics = built.eval_step(state.params, batch)
  plain = hooks.LOSSES["lm"](built.model, state.params, batch)[1]
  chex.assert_trees_all_close(metrics["loss"], plain["loss"], atol=1e-6)
  _, train_metrics = built.train_step(state, batch)  # donates the state
  assert entered == [False, True]  # once per trace: eval, then train
  assert np.isfinite(float(jax.device_get(train_metrics["loss"])))

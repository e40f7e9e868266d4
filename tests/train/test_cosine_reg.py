"""The cosine regulariser (jaxtricks.train.cosine_reg): the mean cosine and its gradient against
numpy, the term of a real model against the states the linearity analysis records, added to the
training objective only (evaluation unchanged), and its one-line config errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.analysis.linearity import block_states
from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train.cosine_reg import mean_cosine
from jaxtricks.train.losses import lm_loss
from tests import support


def np_cos_and_grad(x, y):
  """Mean over tokens of cos(x_n, y_n) and its gradient with respect to x and y."""
  nx, ny = np.linalg.norm(x, axis=-1, keepdims=True), np.linalg.norm(y, axis=-1, keepdims=True)
  cos = np.sum(x * y, -1, keepdims=True) / (nx * ny)
  n = x.shape[0] * x.shape[1]
  gx = (y / (nx * ny) - cos * x / nx ** 2) / n
  gy = (x / (nx * ny) - cos * y / ny ** 2) / n
  return cos.mean(), gx, gy


def test_mean_cosine_and_gradient_against_numpy():
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((2, 5, 7)), rng.standard_normal((2, 5, 7))
  cos, gx, gy = np_cos_and_grad(x, y)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  got, (jx, jy) = jax.value_and_grad(lambda a, b: mean_cosine([(a, b)], eps=0.0),
                                     argnums=(0, 1))(f32(x), f32(y))
  chex.assert_trees_all_close(got, cos, atol=1e-6)
  chex.assert_trees_all_close((jx, jy), (gx, gy), atol=1e-6)
  # Two blocks: the mean of their means.
  two = mean_cosine([(f32(x), f32(y)), (f32(y), f32(y))])
  chex.assert_trees_all_close(two, (cos + 1.0) / 2, atol=1e-6)


CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, attention=AttentionConfig(n_heads=4))


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_term_is_added_in_training_only(mode):
  cfg = override(CFG, {"regulariser": "cosine", "regulariser.weight": 0.5,
                       "regulariser.mode": mode})
  model, plain = Transformer(cfg), Transformer(CFG)
  tokens = np.random.default_rng(1).integers(0, 64, (2, 9)).astype(np.int32)
  params = support.random_params(plain, jnp.asarray(tokens))
  batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1)}
  states = block_states(plain, params, tokens).astype(np.float64)  # (L+1, N, D)
  cos = np.mean([np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1)
                                              * np.linalg.norm(b, axis=-1)))
                 for a, b in zip(states[:-1], states[1:], strict=True)])
  expected = 0.5 * ((1 - cos) if mode == "pull" else cos)
  loss, metrics = lm_loss(model, params, batch, train=True)
  base, _ = lm_loss(plain, params, batch, train=True)
  chex.assert_trees_all_close(metrics["cos_sim"], cos, atol=1e-5)
  chex.assert_trees_all_close(metrics["cos_reg"], expected, atol=1e-5)
  chex.assert_trees_all_close(loss, base + expected, atol=1e-5)
  chex.assert_trees_all_close(metrics["loss"], base, atol=1e-6)
  val_loss, val_metrics = lm_loss(model, params, batch, train=False)
  plain_val, plain_metrics = lm_loss(plain, params, batch, train=False)
  assert set(val_metrics) == set(plain_metrics)
  chex.assert_trees_all_equal(val_loss, plain_val)


@pytest.mark.parametrize("overrides,message", [
    ({"regulariser.weight": -1.0}, r"model.regulariser.weight must be finite and >= 0"),
    ({"regulariser.weight": float("nan")}, r"model.regulariser.weight must be finite"),
    ({"regulariser.mode": "twist"}, r"model.regulariser.mode='twist' is unknown; valid: pull"),
])
def test_bad_settings_are_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    override(CFG, {"regulariser": "cosine", **overrides}).validate()


def test_loss_context_reuses_the_forward_pass():
  """Inside its loss context the term reads the loss's own forward pass (block 0 runs once, not
  twice) and gives the value and gradient of the term's own forward."""
  import flax.linen as nn  # noqa: PLC0415

  from jaxtricks.models.block_hooks import trunk_layer  # noqa: PLC0415
  from jaxtricks.train.hooks import with_contexts  # noqa: PLC0415

  cfg = override(CFG, {"regulariser": "cosine", "regulariser.weight": 0.5})
  model = Transformer(cfg)
  tokens = np.random.default_rng(2).integers(0, 64, (2, 9)).astype(np.int32)
  params = support.random_params(model, jnp.asarray(tokens))
  batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1)}
  calls = []

  def count(next_fun, args, kwargs, context):
    if trunk_layer(context) == 0:
      calls.append(1)
    return next_fun(*args, **kwargs)

  grads = {}
  for name, fn in (("own", lm_loss), ("context", with_contexts(lm_loss))):
    calls.clear()
    with nn.intercept_methods(count):  # counted while tracing
      (value, metrics), grads[name] = jax.jit(jax.value_and_grad(
          lambda p, f=fn: f(model, p, batch, True), has_aux=True))(params)
    assert len(calls) == (2 if name == "own" else 1), name
    grads[name + "_value"] = (value, metrics["cos_reg"])
  chex.assert_trees_all_close(grads["context_value"], grads["own_value"], atol=1e-6)
  chex.assert_trees_all_close(grads["context"], grads["own"], atol=1e-6)

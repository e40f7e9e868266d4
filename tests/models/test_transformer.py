"""The Transformer LM: shapes and finiteness, causality through gradients, GQA + cross-layer K/V."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.embed import Embed
from jaxtricks.models.transformer import ModelConfig, Transformer

B, T = 2, 12
# Grouped K/V heads (4 query heads, 2 K/V heads) and cross-layer K/V (layer 1 reads layer 0's).
CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=2,
                     attention=AttentionConfig(n_heads=4, n_kv_heads=2, kv_sharing=2))


@pytest.fixture(scope="module")
def model_and_params():
  CONFIG.validate()
  model = Transformer(CONFIG)
  tokens = jnp.zeros((B, T), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  return model, params


def tokens_of(seed):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (B, T)), jnp.int32)


def test_logits_shape_and_finiteness(model_and_params):
  model, params = model_and_params
  logits = jax.jit(model.apply)({"params": params}, tokens_of(0))
  chex.assert_shape(logits, (B, T, CONFIG.vocab_size))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  chex.assert_tree_all_finite(params)


def test_parameters_follow_the_config(model_and_params):
  _, params = model_and_params
  h = CONFIG.dim_per_head
  chex.assert_shape(params["embed"]["embedding"], (64, 32))
  chex.assert_shape(params["block_0"]["attn"]["q"]["kernel"], (32, 4, h))
  chex.assert_shape(params["block_0"]["attn"]["k"]["kernel"], (32, 2, h))
  chex.assert_shape(params["block_0"]["mlp"]["gate"]["kernel"], (32, CONFIG.mlp.width(CONFIG)))
  assert "k" not in params["block_1"]["attn"]  # CLA: the sharing layer has no K/V projections
  assert "kv_norm" in params["block_0"] and "kv_norm" not in params["block_1"]


def _logits_with_embedding_offset(model, params, tokens, delta_BxTxD):
  """Logits when `delta` is added to the embedding output: a continuous input per position."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Embed) and context.method_name == "__call__":
      out = out + delta_BxTxD
    return out
  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, tokens)


def test_causality_through_gradients(model_and_params):
  """d logits[:, t] / d x[:, s], x the embedded input, is exactly zero for s > t, non-zero for
  s <= t, and zero across batch rows."""
  model, params = model_and_params
  tokens = tokens_of(1)
  w = jax.random.normal(jax.random.key(1), (B, T, CONFIG.vocab_size))

  def readout(delta, t, row):
    logits = _logits_with_embedding_offset(model, params, tokens, delta)
    return jnp.sum(jax.lax.dynamic_index_in_dim(logits[row] * w[row], t, keepdims=False))

  zeros = jnp.zeros((B, T, CONFIG.d_model))
  grad_of = jax.jit(jax.vmap(jax.vmap(jax.grad(readout), (None, 0, None)), (None, None, 0)))
  g = np.asarray(grad_of(zeros, jnp.arange(T), jnp.arange(B)))  # (row, t, B, T, D)
  norms = np.abs(g).sum(-1)  # (row, t, B, S)
  for row in range(B):
    for t in range(T):
      assert np.all(norms[row, t, row, t + 1:] == 0.0), f"row {row}: logits at {t} see the future"
      assert np.all(norms[row, t, row, :t + 1] > 0.0), f"row {row}: logits at {t} miss the past"
      assert np.all(np.delete(norms[row, t], row, axis=0) == 0.0), "batch rows interact"


def test_changing_later_tokens_leaves_earlier_logits_unchanged(model_and_params):
  model, params = model_and_params
  apply = jax.jit(model.apply)
  tokens = tokens_of(2)
  base = np.asarray(apply({"params": params}, tokens))
  t = 5
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % CONFIG.vocab_size)
  other = np.asarray(apply({"params": params}, changed))
  np.testing.assert_allclose(other[:, :t + 1], base[:, :t + 1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(other[:, t + 1:], base[:, t + 1:])


def test_positions_shift_is_invisible_within_the_sequence(model_and_params):
  """RoPE is relative: starting the positions at 100 instead of 0 changes logits only by
  floating-point error."""
  model, params = model_and_params
  apply = jax.jit(model.apply)
  tokens = tokens_of(3)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  base = np.asarray(apply({"params": params}, tokens, positions))
  shifted = np.asarray(apply({"params": params}, tokens, positions + 100))
  np.testing.assert_allclose(shifted, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes,message", [
    ({"attention.n_heads": 3}, "model.attention.n_heads=3 does not divide model.d_model=32"),
    ({"attention.n_kv_heads": 3},
     "model.attention.n_kv_heads=3 does not divide model.attention.n_heads=4"),
    ({"attention": "flash"}, "attention='flash' is unknown; valid: lckv, linear, mha"),
    ({"attention.impl": "fast"}, "valid: naive, xla, cudnn"),
    ({"attention.kv_sharing": 3}, "CLA sharing factor 3 must be between 1 and the depth 2"),
    ({"dtype": "float8"}, "model.dtype='float8'"),
    ({"d_model": 36}, "RoPE needs an even head dimension, got 9"),
])
def test_invalid_configs_are_refused(changes, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    override(CONFIG, changes).validate()

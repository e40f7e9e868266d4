"""The `linear` attention kind in a Transformer: decoding one token at a time through the state
equals the full forward pass, prefill in chunks and ragged batches, greedy generation against a
naive loop of full forward passes, a decode state whose bytes do not depend on the context, and
the one-line refusals (options it has no use for, speculative and tree decoding)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import override
from jaxtricks.decode import (
  decode_state_bytes,
  generate,
  init_cache,
  speculative_generate,
  teacher_forced_logits,
)
from jaxtricks.decode_tree import tree_generate
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.linear_attention import LinearAttentionConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops.attention import kv_bytes_per_token
from tests import support

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2,
                  attention=LinearAttentionConfig(n_heads=4, n_kv_heads=2, chunk=4))
B, T = 2, 13


@pytest.fixture(scope="module")
def model_params():
  model = Transformer(CFG)
  tokens = jnp.zeros((B, T), jnp.int32)
  return model, support.random_params(model, tokens, seed=3)


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


def test_decoding_token_by_token_equals_the_forward_pass(model_params, tokens):
  model, params = model_params
  full = model.apply({"params": params}, tokens)
  chex.assert_trees_all_close(teacher_forced_logits(model, params, tokens), full, atol=1e-4,
                              rtol=1e-4)


def test_prefill_in_chunks_equals_the_forward_pass(model_params, tokens):
  model, params = model_params
  full = model.apply({"params": params}, tokens)
  cache = init_cache(CFG, B, T)
  parts = []
  for start, stop in ((0, 6), (6, 7), (7, T)):
    logits, cache = model.apply({"params": params}, tokens[:, start:stop], cache,
                                method="decode")
    parts.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_ragged_greedy_generation_equals_full_forward_passes(model_params):
  """Each row's generated tokens are the argmax of the full forward pass over its prompt and the
  tokens before them (one forward per row: greedy decoding checked without decoding)."""
  model, params = model_params
  prompts = [[5, 9, 2, 7, 1, 3, 3], [8], [4, 4, 6]]
  out = generate(model, params, prompts, 5)
  for row, prompt in enumerate(prompts):
    seq = jnp.asarray([prompt + out.tokens[row].tolist()], jnp.int32)
    greedy = jnp.argmax(model.apply({"params": params}, seq)[0], -1)
    assert out.tokens[row].tolist() == greedy[len(prompt) - 1:-1].tolist(), row


def test_decode_state_bytes_do_not_grow_with_the_context():
  h, k = CFG.dim_per_head, 2
  per_layer = 4 * (k * h * h + k * h) + 4 * 3 * k * h  # S, z in float32; 3 conv values
  assert decode_state_bytes(CFG, 1024) == decode_state_bytes(CFG, 32768) == 2 * per_layer
  softmax = override(CFG, {"attention": "mha"})
  assert isinstance(softmax.attention, AttentionConfig)
  assert decode_state_bytes(softmax, 32768) == 32768 * kv_bytes_per_token(softmax)


@pytest.mark.parametrize("overrides,message", [
    ({"attention.kv_sharing": 2}, r"model.attention.kv_sharing=2: linear attention"),
    ({"attention.window": 8}, r"model.attention.window=8"),
    ({"attention.impl": "xla"}, r"model.attention.impl='xla'"),
    ({"attention.hyper_layers": (0,)}, r"model.attention.hyper_layers=\(0,\)"),
    ({"attention.conv": -1}, r"model.attention.conv must be >= 0"),
    ({"attention.chunk": 0}, r"model.attention.chunk must be >= 1"),
    ({"attention.n_kv_heads": 3}, r"n_kv_heads=3 does not divide"),
])
def test_bad_settings_are_refused_in_one_line(overrides, message):
  with pytest.raises(ConfigError, match=message):
    override(CFG, overrides).validate()


def test_speculative_and_tree_decoding_are_refused():
  cfg = override(CFG, {"mtp.heads": 3})
  model = Transformer(cfg)
  params = support.random_params(model, jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="cannot be rolled back"):
    speculative_generate(model, params, [[1, 2]], 4)
  with pytest.raises(ValueError, match="does not decode candidate trees"):
    tree_generate(model, params, [[1, 2]], 4, tree=(2, 1))

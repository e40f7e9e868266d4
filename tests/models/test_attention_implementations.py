"""The attention implementations inside the model: blockwise exact attention (online softmax,
arXiv 2112.05682) equals the naive one for every K/V layout, forward and gradients; HyperAttention
(arXiv 2310.05869) patched into some layers is exact with one block and no samples; bad settings
are refused naming the field."""

import chex
import jax
import jax.numpy as jnp
import pytest

from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.lckv import LCKVAttention
from jaxtricks.models.transformer import ModelConfig, Transformer

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=4,
                   attention=AttentionConfig(n_heads=4, n_kv_heads=2))
MODELS = {
    "gqa": BASE,
    "yoco_like": override(BASE, {"attention.kv_layout": (0, 1, 2, 2), "attention.window": 3,
                                 "attention.window_layers": (0, 1)}),
    "lckv": override(BASE, {"attention": LCKVAttention(n_heads=4, n_kv_heads=2, iterations=3)}),
}
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


def loss_and_grads(cfg, params):
  def loss(p):
    logits = Transformer(cfg).apply({"params": p}, TOKENS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  return jax.jit(jax.value_and_grad(loss))(params)  # jitted: eager dispatch is slower here


@pytest.mark.parametrize("name", list(MODELS))
def test_blockwise_equals_naive_in_the_model(name):
  cfg = MODELS[name]
  params = Transformer(cfg).init(jax.random.key(0), TOKENS)["params"]
  blockwise = override(cfg, {"attention.impl": "blockwise", "attention.block_size": 5})
  blockwise.validate()
  chex.assert_trees_all_close(loss_and_grads(blockwise, params), loss_and_grads(cfg, params),
                              atol=1e-5)


def test_hyper_attention_with_one_block_and_no_samples_is_exact():
  params = Transformer(BASE).init(jax.random.key(0), TOKENS)["params"]
  patched = override(BASE, {"attention.hyper_layers": (2, 3), "attention.hyper_block": 12,
                            "attention.hyper_samples": 0, "attention.hyper_min_len": 4})
  patched.validate()
  chex.assert_trees_all_close(Transformer(patched).apply({"params": params}, TOKENS),
                              Transformer(BASE).apply({"params": params}, TOKENS), atol=1e-5)
  approx = override(patched, {"attention.hyper_block": 3, "attention.hyper_samples": 2,
                             "attention.hyper_min_len": 3})
  out = Transformer(approx).apply({"params": params}, TOKENS)
  assert float(jnp.max(jnp.abs(out - Transformer(BASE).apply({"params": params}, TOKENS)))) > 0


@pytest.mark.parametrize("cfg,message", [
    (override(BASE, {"attention.hyper_layers": (4,)}), "hyper_layers names layer 4, outside"),
    (override(MODELS["yoco_like"], {"attention.impl": "hyper"}),
     "HyperAttention in layer 0 approximates plain causal attention"),
    (override(MODELS["lckv"], {"attention.hyper_layers": (1,)}),
     "HyperAttention in layer 1 approximates"),
    (override(BASE, {"attention.hyper_samples": -1}), "hyper_samples must be >= 0"),
    (override(BASE, {"attention.block_size": 0}), "block_size must be >= 1"),
])
def test_bad_implementation_settings_are_refused(cfg, message):
  with pytest.raises(ConfigError, match=message):
    cfg.validate()


def test_a_hyper_block_not_dividing_the_sequence_is_refused_naming_the_field():
  cfg = override(BASE, {"attention.impl": "hyper", "attention.hyper_block": 5,
                        "attention.hyper_min_len": 4})
  cfg.validate()
  with pytest.raises(ConfigError, match=r"model.attention.hyper_block=5, .*block_size=5 does "
                                        r"not divide"):
    Transformer(cfg).init(jax.random.key(0), TOKENS)

"""NEFTune (arXiv 2310.05914) as an embedding component: noise in training only, of the paper's
scale alpha / sqrt(T d), and a training step that is a function of the seed."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import Config, override
from jaxtricks.decode import generate
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.neftune import NEFTuneEmbedConfig, NoisyEmbed
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train.build import build
from jaxtricks.train.config import TrainConfig

ALPHA = 5.0
NOISY = ModelConfig(vocab_size=32, d_model=16, n_layers=1, attention=AttentionConfig(n_heads=2),
                    embed=NEFTuneEmbedConfig(neftune_alpha=ALPHA))
PLAIN = override(NOISY, {"embed": "token"})
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)


@pytest.fixture(scope="module")
def params():
  return Transformer(NOISY).init(jax.random.key(0), TOKENS)["params"]


def test_the_kind_is_chosen_on_the_command_line():
  cfg = override(Config(), {"model.embed": "neftune", "model.embed.neftune_alpha": "10"})
  assert cfg.model.embed == NEFTuneEmbedConfig(neftune_alpha=10.0)
  assert cfg.model.rng_streams == ("noise",) and PLAIN.rng_streams == ()


def test_noise_in_training_only(params):
  noisy, plain = Transformer(NOISY), Transformer(PLAIN)
  evaluated = noisy.apply({"params": params}, TOKENS)
  chex.assert_trees_all_equal(evaluated, plain.apply({"params": params}, TOKENS))
  trained = [noisy.apply({"params": params}, TOKENS, train=True, rngs={"noise": jax.random.key(s)})
             for s in (1, 1, 2)]
  chex.assert_trees_all_equal(trained[0], trained[1])  # a function of the key
  assert float(jnp.abs(trained[0] - evaluated).max()) > 1e-3
  assert float(jnp.abs(trained[0] - trained[2]).max()) > 1e-3
  # decoding is evaluation: the same tokens as the model without noise
  chex.assert_trees_all_equal(generate(noisy, params, [[3, 4, 5]], 6).tokens,
                              generate(plain, params, [[3, 4, 5]], 6).tokens)


def test_noise_scale_is_alpha_over_sqrt_t_d():
  b, t, d = 64, 32, 48
  embed = NoisyEmbed(256, d, alpha=ALPHA)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (b, t)), jnp.int32)
  variables = embed.init(jax.random.key(0), tokens)
  clean = embed.apply(variables, tokens)
  noise = np.asarray(embed.apply(variables, tokens, train=True, rngs={"noise": jax.random.key(3)})
                     - clean, np.float64)
  bound = ALPHA / math.sqrt(t * d)
  assert np.abs(noise).max() <= bound * (1 + 1e-5)
  assert np.abs(noise).max() > 0.99 * bound           # uniform up to the bound
  np.testing.assert_allclose(np.linalg.norm(noise), bound * math.sqrt(b * t * d / 3), rtol=0.01)
  assert abs(noise.mean()) < 0.01 * bound


def test_a_train_step_is_deterministic_given_the_seed():
  train = TrainConfig(steps=2, batch_size=2, seq_len=8, warmup_steps=0, lr=1e-2, seed=5)
  built = build(Config(model=NOISY, train=train))
  batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1)}

  def one_step(seed):
    state, metrics = built.train_step(built.init_state(seed), batch)
    return jax.device_get((state.params, metrics["loss"]))

  first, again, other = one_step(5), one_step(5), one_step(6)
  chex.assert_trees_all_equal(first, again)
  plain = build(Config(model=PLAIN, train=train))
  plain_state, plain_metrics = plain.train_step(plain.init_state(5), batch)
  # the same initial parameters (the table is shared), so the loss differs by the noise alone
  assert float(first[1]) != float(plain_metrics["loss"])
  assert float(other[1]) != float(first[1])
  evaluated = built.eval_step(built.init_state(5).params, batch)
  assert float(evaluated["loss"]) == pytest.approx(float(plain.eval_step(
      plain.init_state(5).params, batch)["loss"]), rel=1e-6)

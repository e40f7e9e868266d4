"""PRepBN (SLAB): the gamma schedule, the statistics update and the training output against
numpy, folding into the affine map equal to the running-statistics path, causal evaluation of a
trained model, and its one-line config errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from experiments import get_config
from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.prepbn import STATS, PRepBN, PRepBNConfig, gamma_schedule
from jaxtricks.models.merge import merged_params
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train.build import build
from tests import support

EPS, MOMENTUM = 1e-6, 0.9
MODEL = ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=2),
                    norm=PRepBNConfig(warm=2, steps=4))


def test_gamma_schedule_is_one_during_warmup_then_decays_linearly_to_zero():
  t = np.arange(10)
  expected = np.where(t < 2, 1.0, 0.8 * np.clip(1 - (t - 2) / 4, 0, 1))
  chex.assert_trees_all_close(np.asarray(gamma_schedule(t, 2, 4, 0.8)), expected, atol=1e-7)


def numpy_prepbn(x, p, gamma):
  rms = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * p["scale"]
  mu, var = x.reshape(-1, x.shape[-1]).mean(0), x.reshape(-1, x.shape[-1]).var(0)
  rep = (x - mu) / np.sqrt(var + EPS) * p["bn_scale"] + p["bn_bias"] + p["eta"] * x
  return gamma * rms + (1 - gamma) * rep, mu, var


def test_training_output_and_statistics_update_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 2.0, (3, 5, 8)).astype(np.float32)
  module = PRepBN(eps=EPS, momentum=MOMENTUM, warm=1, steps=4)
  variables = nn.unbox(module.init(jax.random.key(0), x))
  params = jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32),
                        jax.device_get(variables["params"]))
  stats = variables[STATS]
  for t in range(4):  # counts 0..3: gamma 1, 1, 0.75, 0.5
    y, new = module.apply({"params": params, STATS: stats}, x, train=True, mutable=[STATS])
    expected, mu, var = numpy_prepbn(x.astype(np.float64), params, float(gamma_schedule(t, 1, 4)))
    chex.assert_trees_all_close(np.asarray(y), expected, atol=2e-5)
    chex.assert_trees_all_close(np.asarray(new[STATS]["mean"]),
                                MOMENTUM * np.asarray(stats["mean"]) + (1 - MOMENTUM) * mu,
                                atol=1e-5)
    chex.assert_trees_all_close(np.asarray(new[STATS]["var"]),
                                MOMENTUM * np.asarray(stats["var"]) + (1 - MOMENTUM) * var,
                                rtol=1e-5)
    assert int(new[STATS]["count"]) == t + 1
    stats = new[STATS]


def trained_stats(model, params, tokens, steps):
  """Running statistics after `steps` training forward passes on `tokens`."""
  stats = nn.unbox(model.init(jax.random.key(1), tokens)[STATS])
  for _ in range(steps):
    _, new = model.apply({"params": params, STATS: stats}, tokens, train=True, mutable=[STATS])
    stats = new[STATS]
  return stats


def test_folded_affine_model_equals_the_running_statistics_path():
  model = Transformer(MODEL)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
  params = support.random_params(model, tokens)
  stats = trained_stats(model, params, tokens, 6)  # past warm + steps: gamma = 0
  logits = model.apply({"params": params, STATS: stats}, tokens)
  folded_config, folded = merged_params(MODEL, params, collections={STATS: stats})
  assert folded_config.norm.kind == "affine"
  flat = traverse_util.flatten_dict(folded)
  assert not any(k[-1] in ("bn_scale", "eta") for k in flat)
  chex.assert_trees_all_close(Transformer(folded_config).apply({"params": folded}, tokens),
                              logits, atol=1e-5)
  with pytest.raises(ValueError, match=r"gamma = .* > 0 after 3 steps"):
    merged_params(MODEL, params, collections={STATS: trained_stats(model, params, tokens, 3)})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two train steps of the smoke LM with PRepBN (gamma mid-schedule), through the real step."""
  config = override(get_config("lm", "smoke"), {"model.norm": "prepbn", "model.norm.warm": 1,
                                                 "model.norm.steps": 4})
  built = build(config)
  state = built.init_state()
  rng = np.random.default_rng(0)
  tc = config.train
  tokens = rng.integers(0, config.model.vocab_size, (tc.batch_size, tc.seq_len + 1))
  batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
  before = jax.device_get(state.model_collections())
  for _ in range(2):
    state, _ = built.train_step(state, jax.device_put(batch, built.batch_sharding))
  return built, state, batch, before


def test_the_train_step_updates_the_statistics_and_evaluation_reads_them(trained):
  built, state, batch, before = trained
  after = jax.device_get(state.model_collections())
  counts = [int(c) for p, c in traverse_util.flatten_dict(after[STATS]).items() if p[-1] == "count"]
  assert counts and set(counts) == {2}
  assert not support.arrays_equal(before, after)
  loss = built.eval_step(state.model_params(), batch, state.model_collections())["loss"]
  variables = {"params": jax.device_get(state.model_params()), **after}
  logits = built.model.apply(variables, batch["inputs"])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)
  chex.assert_trees_all_close(float(loss), float(jnp.mean(nll)), rtol=1e-5)
  with pytest.raises(ValueError, match="keeps the variable collections batch_stats"):
    built.eval_step(state.model_params(), batch)


def test_evaluation_of_the_trained_model_is_causal(trained):
  built, state, batch, _ = trained
  variables = {"params": jax.device_get(state.model_params()),
               **jax.device_get(state.model_collections())}
  tokens = np.asarray(batch["inputs"])
  changed = tokens.copy()
  cut = tokens.shape[1] // 2
  changed[:, cut:] = (changed[:, cut:] + 7) % built.config.model.vocab_size
  a = built.model.apply(variables, jnp.asarray(tokens))
  b = built.model.apply(variables, jnp.asarray(changed))
  chex.assert_trees_all_close(a[:, :cut], b[:, :cut], atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, cut:] - b[:, cut:]))) > 1e-3
  # training statistics mix the positions of a sequence (the documented non-causality)
  mix = lambda t: built.model.apply(variables, jnp.asarray(t), train=True, mutable=[STATS])[0]
  assert float(jnp.max(jnp.abs(mix(tokens)[:, :cut] - mix(changed)[:, :cut]))) > 1e-6


@pytest.mark.parametrize("overrides,message", [
    ({"model.norm.r0": 1.5}, r"model.norm.r0=1.5: the gamma schedule must stay in \[0, 1\]"),
    ({"model.norm.r0": -0.1}, r"model.norm.r0=-0.1: the gamma schedule must stay in \[0, 1\]"),
    ({"model.norm.steps": 0}, r"model.norm.steps must be >= 1, got 0"),
    ({"model.norm.momentum": 1.0}, r"model.norm.momentum must be in \[0, 1\), got 1.0"),
    ({"model.mtp.heads": 2}, r"model.norm=prepbn with multi-token heads"),
])
def test_bad_schedules_are_one_line_errors(overrides, message):
  config = override(get_config("lm", "smoke"), {"model.norm": "prepbn", **overrides})
  with pytest.raises(ConfigError, match=message):
    config.validate()

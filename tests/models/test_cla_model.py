"""Cross-Layer Attention in the Transformer (Brandon et al. 2024, arXiv 2405.12981): parameter
counts by hand, separate K/V-input norms in producing layers, causality through gradients, and the
`--exp=cla` smoke run end to end.

Parameters are drawn with numpy from the shapes of `model.init` (jax.eval_shape): compiling
`model.init` (threefry random bits for every parameter) takes longer on a 2-core CPU than all the
other programs of this file together, and none of these tests depends on the initialiser.
"""

import functools
import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cla
from jaxtricks.config import override, to_dict
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.embed import Embed
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops.attention import kv_sources
from tests import support

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=6, attention=AttentionConfig(n_heads=4))
HEADS = {"MHA": 4, "GQA": 2, "MQA": 1}
SHARING = (1, 2, 3)


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@functools.cache
def param_shapes(cfg: ModelConfig) -> dict:
  model = Transformer(cfg)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))[
      "params"]


def expected_params(m: dict) -> int:
  """Parameter count by hand from a model config (as its config.json holds it)."""
  a = m["attention"]
  v, d, n_layers, n = m["vocab_size"], m["d_model"], m["n_layers"], a["n_heads"]
  k = a["n_kv_heads"] or n
  h = a["head_dim"] or d // n
  f = m["mlp"]["d_ff"] or -(-8 * d // 3 // 32) * 32
  sharing, layout = a["kv_sharing"], tuple(a["kv_layout"])
  if layout:
    producers = len(set(layout))
  else:
    producers = math.ceil(n_layers / sharing)
  cross_layer = producers < n_layers
  per_layer = 2 * d + d * n * h + n * h * d + 3 * d * f  # attn_norm, mlp_norm, q, o, SwiGLU
  per_producer = 2 * d * k * h + (d if cross_layer else 0)  # k, v (+ kv_norm scale under CLA)
  return 2 * v * d + d + n_layers * per_layer + producers * per_producer  # embed, head, norm


def variant(heads: str, sharing: int, **attention) -> ModelConfig:
  return override(BASE, {"attention.n_kv_heads": HEADS[heads], "attention.kv_sharing": sharing,
                         **{f"attention.{k}": v for k, v in attention.items()}})


@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("heads", list(HEADS))
def test_parameter_count_by_hand(heads, sharing):
  cfg = variant(heads, sharing)
  cfg.validate()
  assert count(param_shapes(cfg)) == expected_params(to_dict(cfg))


@pytest.mark.parametrize("sharing", [2, 3])
@pytest.mark.parametrize("heads", list(HEADS))
def test_cla_removes_exactly_the_kv_projections_of_sharing_layers(heads, sharing):
  """CLA-s params = CLA-1 params - (K and V kernels of non-producing layers) + (kv_norm scales
  of producing layers)."""
  d, k, h = BASE.d_model, HEADS[heads], BASE.dim_per_head
  producers = math.ceil(BASE.n_layers / sharing)  # 6 layers: CLA2 3, CLA3 2 producing layers
  removed = (BASE.n_layers - producers) * 2 * d * k * h
  added = producers * d
  assert count(param_shapes(variant(heads, 1))) - count(param_shapes(variant(heads, sharing))) \
      == removed - added


def test_parameter_count_with_head_dim_and_layout():
  cfg = override(variant("GQA", 1, head_dim=16, kv_layout=(0, 1, 1, 1, 1, 5)), {"mlp.d_ff": 64})
  cfg.validate()
  assert count(param_shapes(cfg)) == expected_params(to_dict(cfg))


@pytest.mark.parametrize("sharing", SHARING)
def test_only_producing_layers_have_kv_projections_and_kv_norm(sharing):
  cfg = variant("GQA", sharing)
  params = param_shapes(cfg)
  for i in range(cfg.n_layers):
    block = params[f"block_{i}"]
    produces = cfg.kv_source[i] == i
    assert ("k" in block["attn"]) == produces and ("v" in block["attn"]) == produces
    assert ("kv_norm" in block) == (produces and sharing > 1), (i, sorted(block))
    if produces:
      chex.assert_shape(block["attn"]["k"]["kernel"], (32, HEADS["GQA"], 8))


# Causality through gradients, on a 4-layer GQA-CLA2 model (layers 1 and 3 reuse K/V of 0 and 2).
B, T = 2, 8
CAUSAL_CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4,
                         attention=AttentionConfig(n_heads=4, n_kv_heads=2, kv_sharing=2))


@pytest.fixture(scope="module")
def causal_model():
  assert CAUSAL_CFG.kv_source == (0, 0, 2, 2)
  model = Transformer(CAUSAL_CFG)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (B, T)), jnp.int32)
  return model, support.random_params(model, tokens, seed=1), tokens


def logits_with_embedding_offset(model, params, tokens, delta_BxTxD):
  """Logits when `delta` is added to the embedding output (the model's continuous input)."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Embed) and context.method_name == "__call__":
      out = out + delta_BxTxD
    return out

  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, tokens)


def test_causality_through_gradients(causal_model):
  """d readout(logits[b, t]) / d x[b', s] is exactly 0 unless b' == b and s <= t, and non-zero
  for every s <= t (x: the embedded input, readout: a random linear function of the logits)."""
  model, params, tokens = causal_model
  w_V = jnp.asarray(np.random.default_rng(2).standard_normal(CAUSAL_CFG.vocab_size), jnp.float32)

  def readout(delta_BxTxD):
    return logits_with_embedding_offset(model, params, tokens, delta_BxTxD) @ w_V  # (B, T)

  delta = jnp.zeros((B, T, CAUSAL_CFG.d_model))
  assert np.abs(np.asarray(readout(delta) - model.apply({"params": params}, tokens) @ w_V)).max() \
      == 0.0  # the interceptor only adds delta
  jac = np.asarray(jax.jit(jax.jacrev(readout))(delta))  # (B, T, B', S, D)
  norms = np.abs(jac).sum(-1)  # (B, T, B', S)
  allowed = np.einsum("bc,ts->btcs", np.eye(B), np.tril(np.ones((T, T))))
  assert np.all(norms[allowed == 0] == 0.0), np.argwhere((allowed == 0) & (norms != 0))[:5]
  assert np.all(norms[allowed == 1] > 1e-6), np.argwhere((allowed == 1) & (norms <= 1e-6))[:5]


@pytest.mark.parametrize("impl", ["naive", "xla"])
def test_future_tokens_do_not_change_past_logits(causal_model, impl):
  model, params, tokens = causal_model
  model = Transformer(override(CAUSAL_CFG, {"attention.impl": impl}))
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  base = np.asarray(apply(tokens))
  for t in (0, 3, T - 2):
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % CAUSAL_CFG.vocab_size)
    out = np.asarray(apply(changed))
    chex.assert_trees_all_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
    assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max(-1).min() > 1e-4


def test_kv_norm_normalises_the_kv_input_only(causal_model):
  """The K/V input of a producing layer has a norm of its own: scaling block_2's kv_norm scale
  (not its attn_norm) changes the K/V that layers 2 and 3 attend to, hence every logit."""
  model, params, tokens = causal_model
  apply = jax.jit(lambda p: model.apply({"params": p}, tokens))
  changed = jax.tree.map(lambda x: x, params)
  changed["block_2"]["kv_norm"]["scale"] = params["block_2"]["kv_norm"]["scale"] * 1.5
  a, b = np.asarray(apply(params)), np.asarray(apply(changed))
  assert np.abs(a - b).max(-1).min() > 1e-5


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_cla_experiment_smoke_end_to_end(tmp_path):
  """`python launch.py --exp=cla --preset=smoke --workdir=TMP`: summary rows, figure, KV bytes."""
  workdir = tmp_path / "cla"
  proc = support.launch("--exp=cla", "--preset=smoke", f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  png = workdir / "cla.png"
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert summary["figures"] == ["cla.png"]
  support.assert_readme_summary_keys(summary, "cla")
  rows = {r["name"]: r for r in summary["variants"]}
  smoke, default = cla.get_config("smoke"), cla.get_config("default")
  assert smoke.variants == default.variants == ()  # the same six, in the same order
  assert list(rows) == list(cla.variant_overrides(smoke.model))
  assert list(rows) == ["MHA", "GQA2", "MQA", "H4-MQA", "MQA-CLA2", "MQA-CLA3"]
  keys = {"name", "params", "kv_bytes_per_token", "val_loss", "decode_tokens_per_s",
          "max_batch_at_context"}
  models = {}
  for name, row in rows.items():
    assert keys <= set(row), (name, sorted(row))
    m = json.loads((workdir / "variants" / name / "config.json").read_text())["model"]
    models[name] = m
    a = m["attention"]
    h = a["head_dim"] or m["d_model"] // a["n_heads"]
    producers = len(set(row["kv_source"]))
    assert row["params"] == expected_params(m), name
    assert row["kv_bytes_per_token"] == 2 * (a["n_kv_heads"] or a["n_heads"]) * h * producers * 4
    per_sequence = row["kv_bytes_per_token"] * summary["context_len"]
    assert row.get("cache_bytes_per_sequence", per_sequence) == per_sequence
    assert row["max_batch_at_context"] == summary["budget_bytes"] // per_sequence
    assert math.isfinite(row["val_loss"]) and 0 < row["val_loss"] < 10
    assert row["decode_tokens_per_s"] > 0
  n_layers = models["MQA"]["n_layers"]
  assert rows["MQA"]["kv_source"] == list(range(n_layers))
  assert rows["MQA-CLA2"]["kv_source"] == list(kv_sources(n_layers, 2))
  cla2, mqa = rows["MQA-CLA2"]["kv_bytes_per_token"], rows["MQA"]["kv_bytes_per_token"]
  assert cla2 * n_layers == mqa * math.ceil(n_layers / 2)
  assert rows["MHA"]["kv_bytes_per_token"] == 4 * mqa  # 4 heads against 1
  assert n_layers % 2 == 0, "the smoke preset should show CLA2 halving the cache"
  assert 2 * cla2 == mqa

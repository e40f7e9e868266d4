"""Grouped K/V heads (MHA / GQA / MQA, arXiv 2305.13245, 1911.02150) and Cross-Layer Attention
K/V layouts (arXiv 2405.12981): grouped attention against explicit K/V repetition, against
jax.nn.dot_product_attention and against numpy; KV bytes per token against the CLA paper's Table 1.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.errors import ConfigError
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.ops.attention import attention, causal_mask, kv_bytes_per_token, kv_sources

B, S, H = 2, 9, 8
# (query heads N, K/V heads K): MHA, GQA, MQA.
HEADS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}

attention_jit = jax.jit(attention, static_argnames="implementation")
dpa_jit = jax.jit(jax.nn.dot_product_attention, static_argnames=("implementation", "is_causal"))


def make_inputs(n, k, t, seed=0):
  """q (B, t, N, H) for the last t positions, k, v (B, S, K, H), and the causal mask (B, t, S)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, t, n, H)).astype(np.float32)
  kk = rng.standard_normal((B, S, k, H)).astype(np.float32)
  v = rng.standard_normal((B, S, k, H)).astype(np.float32)
  q_pos = np.broadcast_to(np.arange(S - t, S), (B, t))
  k_pos = np.broadcast_to(np.arange(S), (B, S))
  mask = np.asarray(causal_mask(jnp.asarray(q_pos), jnp.asarray(k_pos)))
  return q, kk, v, mask


def numpy_attention(q, k, v, mask):
  """float64 softmax(q k^T / sqrt(H) + mask) v; query head j reads K/V head j // (N / K)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.fixture(scope="module", params=list(HEADS), ids=list(HEADS))
def inputs(request):
  """Self-attention over all S positions (t = S): a square causal mask."""
  return make_inputs(*HEADS[request.param], t=S)


def test_causal_mask_is_lower_triangular(inputs):
  *_, mask = inputs
  np.testing.assert_array_equal(mask, np.broadcast_to(np.tril(np.ones((S, S), bool)), (B, S, S)))


def test_grouped_equals_explicitly_repeated_kv(inputs):
  q, k, v, mask = inputs
  group = q.shape[2] // k.shape[2]
  grouped = attention_jit(q, k, v, mask)
  repeated = attention_jit(q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), mask)
  np.testing.assert_allclose(np.asarray(grouped), np.asarray(repeated), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", None], ids=["xla", "default"])
def test_grouped_equals_jax_dot_product_attention(inputs, implementation):
  q, k, v, mask = inputs
  ours = np.asarray(attention_jit(q, k, v, mask))
  ref_mask = np.asarray(dpa_jit(q, k, v, mask=mask[:, None], implementation=implementation))
  ref_causal = np.asarray(dpa_jit(q, k, v, is_causal=True, implementation=implementation))
  np.testing.assert_allclose(ours, ref_mask, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours, ref_causal, rtol=1e-5, atol=1e-5)
  # Our 'xla' path is jax.nn.dot_product_attention with the (B, 1, T, S) mask.
  np.testing.assert_allclose(np.asarray(attention_jit(q, k, v, mask, implementation="xla")),
                             ref_mask, rtol=1e-6, atol=1e-6)


def test_grouped_equals_numpy(inputs):
  q, k, v, mask = inputs
  np.testing.assert_allclose(np.asarray(attention_jit(q, k, v, mask)),
                             numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", list(HEADS))
def test_decode_shaped_queries(heads):
  """3 queries at the last positions against all S cached keys (what a decode step computes)."""
  q, k, v, mask = make_inputs(*HEADS[heads], t=3, seed=1)
  ref = numpy_attention(q, k, v, mask)
  for implementation in ("naive", "xla"):
    np.testing.assert_allclose(np.asarray(attention_jit(q, k, v, mask, implementation)), ref,
                               rtol=1e-5, atol=1e-5)


def test_output_of_a_query_ignores_keys_after_it():
  q, k, v, mask = make_inputs(4, 1, t=S, seed=2)
  k2, v2 = k.copy(), v.copy()
  k2[:, 5:] *= -3.0  # change keys and values at positions 5..S-1
  v2[:, 5:] += 100.0
  a = np.asarray(attention_jit(q, k, v, mask))
  b = np.asarray(attention_jit(q, k2, v2, mask))
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert (np.abs(a[:, 5:] - b[:, 5:]).max(-1) > 1e-3).all()  # later queries do see them


# CLA paper (Brandon et al. 2024) Table 1: 20 layers, d_model 2048, 16-bit K/V, bytes per token.
PAPER = ModelConfig(d_model=2048, n_layers=20, n_heads=16, dtype="bfloat16")
TABLE_1 = {
    "MHA": (dict(), 163_840),
    "GQA4": (dict(n_kv_heads=4), 40_960),
    "MQA": (dict(n_kv_heads=1), 10_240),
    "H64-MQA": (dict(n_kv_heads=1, head_dim=64), 5_120),
    "MQA-CLA2": (dict(n_kv_heads=1, kv_sharing=2), 5_120),
    "MQA-CLA3": (dict(n_kv_heads=1, kv_sharing=3), 3_584),
    "MQA-CLA4": (dict(n_kv_heads=1, kv_sharing=4), 2_560),
}


@pytest.mark.parametrize("name", list(TABLE_1))
def test_kv_bytes_per_token_reproduces_cla_table_1(name):
  overrides, expected = TABLE_1[name]
  cfg = dataclasses.replace(PAPER, **overrides)
  cfg.validate()
  assert cfg.dim_per_head == overrides.get("head_dim", 128)
  assert kv_bytes_per_token(cfg) == expected
  assert kv_bytes_per_token(dataclasses.replace(cfg, dtype="float32")) == 2 * expected
  assert kv_bytes_per_token(cfg, bytes_per_element=1) == expected // 2


def test_mqa_cla3_on_20_layers_has_7_producers():
  cfg = dataclasses.replace(PAPER, n_kv_heads=1, kv_sharing=3)
  assert len(cfg.kv_producers) == 7
  assert cfg.kv_producers == (0, 2, 5, 8, 11, 14, 17)  # the short group (layers 0, 1) first


def test_kv_sources_properties():
  for n_layers in range(1, 13):
    for s in range(1, n_layers + 1):
      src = kv_sources(n_layers, s)
      producers = sorted(set(src))
      assert len(src) == n_layers
      assert len(producers) == math.ceil(n_layers / s), (n_layers, s, src)
      for i, j in enumerate(src):
        assert 0 <= j <= i and src[j] == j, (n_layers, s, src)  # a producer at or before i
      assert list(src) == sorted(src)  # groups are consecutive layers
      sizes = [src.count(p) for p in producers]
      assert sizes[1:] == [s] * (len(producers) - 1), (n_layers, s, src)
      assert sizes[0] == (n_layers % s or s)
  assert kv_sources(6, 1) == (0, 1, 2, 3, 4, 5)
  assert kv_sources(6, 2) == (0, 0, 2, 2, 4, 4)
  assert kv_sources(6, 3) == (0, 0, 0, 3, 3, 3)
  assert kv_sources(6, 6) == (0,) * 6


# Non-uniform layouts of the CLA paper's design space (Section 3.2).
GOOD_LAYOUTS = {
    "keep_ends": (0, 1, 1, 1, 1, 5),
    "dense_front": (0, 1, 2, 2, 4, 4),
    "dense_back": (0, 0, 2, 2, 4, 5),
    "all_share_first": (0, 0, 0, 0, 0, 0),
}


@pytest.mark.parametrize("name", list(GOOD_LAYOUTS))
def test_explicit_layouts_are_kept_and_counted(name):
  layout = GOOD_LAYOUTS[name]
  assert kv_sources(6, 1, layout) == layout
  assert kv_sources(6, 3, layout) == layout  # an explicit layout wins over the sharing factor
  cfg = ModelConfig(d_model=32, n_layers=6, n_heads=4, n_kv_heads=1, kv_layout=layout)
  cfg.validate()
  assert cfg.kv_source == layout
  assert cfg.kv_producers == tuple(sorted(set(layout)))
  assert kv_bytes_per_token(cfg) == 2 * 1 * 8 * len(set(layout)) * 4


BAD_LAYOUTS = {
    "too_short": (0, 0, 2, 2, 4),
    "too_long": (0, 0, 2, 2, 4, 4, 6),
    "reads_a_later_layer": (0, 2, 2, 3, 4, 5),
    "reads_a_non_producer": (0, 0, 1, 3, 4, 5),  # layer 1 reads layer 0, so it produces nothing
    "negative": (0, -1, 2, 3, 4, 5),
    "first_layer_cannot_share": (1, 1, 2, 3, 4, 5),
}


@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_bad_layouts_are_refused(name):
  layout = BAD_LAYOUTS[name]
  with pytest.raises(ValueError, match="kv layout"):
    kv_sources(6, 1, layout)
  cfg = ModelConfig(d_model=32, n_layers=6, n_heads=4, kv_layout=layout)
  with pytest.raises(ConfigError, match="model.kv_layout"):
    cfg.validate()


@pytest.mark.parametrize("sharing", [0, -1, 7])
def test_bad_sharing_factors_are_refused(sharing):
  with pytest.raises(ValueError, match="sharing factor"):
    kv_sources(6, sharing)
  with pytest.raises(ConfigError, match="model.kv_sharing"):
    ModelConfig(d_model=32, n_layers=6, n_heads=4, kv_sharing=sharing).validate()

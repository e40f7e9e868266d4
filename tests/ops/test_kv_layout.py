"""Which layers produce K/V and what the cache costs: Cross-Layer Attention layouts (Brandon et
al. 2024, arXiv 2405.12981) from a sharing factor or explicit, their validation, and KV bytes per
token against the CLA paper's Table 1."""

import math

import pytest

from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.ops.attention import kv_bytes_per_token, kv_sources


def test_kv_sources_cross_layer_sharing():
  assert kv_sources(4) == (0, 1, 2, 3)
  assert kv_sources(4, sharing=2) == (0, 0, 2, 2)
  assert kv_sources(5, sharing=2) == (0, 1, 1, 3, 3)  # the short group comes first
  cla3 = kv_sources(20, sharing=3)
  assert len(set(cla3)) == 7  # CLA3 on 20 layers: 7 producers, as in the paper
  assert all(cla3[src] == src and src <= i for i, src in enumerate(cla3))
  assert kv_sources(4, layout=(0, 0, 0, 3)) == (0, 0, 0, 3)
  assert kv_sources(3, layout=(0, 2, 2)) == (0, 2, 2)  # a later layer (LCKV)
  with pytest.raises(ValueError, match="outside the model"):
    kv_sources(3, layout=(0, 3, 3))
  with pytest.raises(ValueError, match="does not produce"):
    kv_sources(3, layout=(0, 0, 1))  # layer 1 does not produce K/V
  with pytest.raises(ValueError):
    kv_sources(3, sharing=4)


def test_kv_bytes_per_token():
  cfg = ModelConfig(d_model=64, n_layers=4, attention=AttentionConfig(n_heads=8, n_kv_heads=2))
  assert kv_bytes_per_token(cfg) == 2 * 2 * 8 * 4 * 4  # K and V, 2 heads, H=8, 4 layers, fp32
  assert kv_bytes_per_token(override(cfg, {"attention.kv_sharing": 2})) == 2 * 2 * 8 * 2 * 4
  assert kv_bytes_per_token(override(cfg, {"dtype": "bfloat16"})) == 2 * 2 * 8 * 4 * 2
  assert kv_bytes_per_token(cfg, bytes_per_element=1) == 2 * 2 * 8 * 4


# CLA paper (Brandon et al. 2024) Table 1: 20 layers, d_model 2048, 16-bit K/V, bytes per token.
PAPER = ModelConfig(d_model=2048, n_layers=20, dtype="bfloat16",
                    attention=AttentionConfig(n_heads=16))
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
  cfg = override(PAPER, {f"attention.{k}": v for k, v in overrides.items()})
  cfg.validate()
  assert cfg.dim_per_head == overrides.get("head_dim", 128)
  assert kv_bytes_per_token(cfg) == expected
  assert kv_bytes_per_token(override(cfg, {"dtype": "float32"})) == 2 * expected
  assert kv_bytes_per_token(cfg, bytes_per_element=1) == expected // 2


def test_mqa_cla3_on_20_layers_has_7_producers():
  cfg = override(PAPER, {"attention.n_kv_heads": 1, "attention.kv_sharing": 3})
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
  cfg = ModelConfig(d_model=32, n_layers=6,
                    attention=AttentionConfig(n_heads=4, n_kv_heads=1, kv_layout=layout))
  cfg.validate()
  assert cfg.kv_source == layout
  assert cfg.kv_producers == tuple(sorted(set(layout)))
  assert kv_bytes_per_token(cfg) == 2 * 1 * 8 * len(set(layout)) * 4


BAD_LAYOUTS = {
    "too_short": (0, 0, 2, 2, 4),
    "too_long": (0, 0, 2, 2, 4, 4, 6),
    "reads_a_non_producer": (0, 0, 1, 3, 4, 5),  # layer 1 reads layer 0, so it produces nothing
    "negative": (0, -1, 2, 3, 4, 5),
    "outside_the_model": (0, 6, 2, 3, 4, 5),
}


@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_bad_layouts_are_refused(name):
  layout = BAD_LAYOUTS[name]
  with pytest.raises(ValueError, match="kv layout"):
    kv_sources(6, 1, layout)
  cfg = ModelConfig(d_model=32, n_layers=6, attention=AttentionConfig(n_heads=4, kv_layout=layout))
  with pytest.raises(ConfigError, match="model.attention: kv layout"):
    cfg.validate()


@pytest.mark.parametrize("layout", [(0, 2, 2, 3, 4, 5), (1, 1, 2, 3, 4, 5)])
def test_layouts_reading_later_layers_need_the_iterative_kind(layout):
  assert kv_sources(6, 1, layout) == layout  # valid layouts (LCKV) ...
  cfg = ModelConfig(d_model=32, n_layers=6, attention=AttentionConfig(n_heads=4, kv_layout=layout))
  with pytest.raises(ConfigError, match="reads the later layer .*--model.attention=lckv"):
    cfg.validate()  # ... which the bottom-to-top `mha` kind cannot run


@pytest.mark.parametrize("sharing", [0, -1, 7])
def test_bad_sharing_factors_are_refused(sharing):
  with pytest.raises(ValueError, match="sharing factor"):
    kv_sources(6, sharing)
  with pytest.raises(ConfigError, match="model.attention: CLA sharing factor"):
    ModelConfig(d_model=32, n_layers=6,
                attention=AttentionConfig(n_heads=4, kv_sharing=sharing)).validate()

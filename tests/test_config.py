"""Config overrides from command-line text: ints, floats, bools, tuples, unknown keys."""

import dataclasses
import json

import pytest

from experiments import get_config, load
from jaxtricks.config import Config, flatten, override, parse_value, to_json
from jaxtricks.errors import ConfigError
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.train.config import TrainConfig

BASE = Config()


def test_flatten_lists_every_leaf_with_a_dotted_key():
  keys = flatten(BASE)
  assert keys["model.d_model"] == 128 and keys["train.lr"] == 3e-3
  assert keys["mesh.fsdp"] == -1 and keys["data.corpus"] == "stdlib"
  assert len(keys) == sum(len(dataclasses.fields(s)) for s in (BASE.model, BASE.train, BASE.data,
                                                                 BASE.mesh))


@pytest.mark.parametrize("key,text,expected", [
    ("model.d_model", "256", 256),
    ("train.steps", "2e3", 2000),
    ("mesh.fsdp", "-1", -1),
    ("train.lr", "3e-4", 3e-4),
    ("train.lr", "0.5", 0.5),
    ("train.lr", "2", 2.0),
    ("model.rope_base", "1e6", 1e6),
    ("model.remat", "true", True),
    ("model.remat", "True", True),
    ("model.remat", "1", True),
    ("model.remat", "yes", True),
    ("model.remat", "off", False),
    ("model.remat", "false", False),
    ("model.kv_layout", "0,0,2,2", (0, 0, 2, 2)),
    ("model.kv_layout", "(0, 0, 2)", (0, 0, 2)),
    ("model.kv_layout", "[0,1]", (0, 1)),
    ("model.kv_layout", "()", ()),
    ("data.corpus", "~/text/**/*.txt", "~/text/**/*.txt"),
])
def test_override_parses_text_by_field_type(key, text, expected):
  cfg = override(BASE, {key: text})
  value = flatten(cfg)[key]
  assert value == expected and type(value) is type(expected)
  # Only that key changed, and the original is untouched (frozen dataclasses).
  assert {k: v for k, v in flatten(cfg).items() if k != key} == \
         {k: v for k, v in flatten(BASE).items() if k != key}
  assert BASE == Config()


def test_override_several_keys_and_non_string_values():
  cfg = override(BASE, {"model.d_model": "64", "model.n_heads": 2, "train.lr": 1e-3,
                        "model.kv_layout": (0, 0)})
  assert (cfg.model.d_model, cfg.model.n_heads, cfg.train.lr) == (64, 2, 1e-3)
  assert cfg.model.kv_layout == (0, 0)
  assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)


def test_override_keeps_the_config_subclass_of_an_experiment():
  cfg = get_config("cla", "smoke")
  assert type(override(cfg, {"train.steps": "3"})) is type(cfg)


def test_unknown_key_names_it_and_suggests():
  with pytest.raises(ConfigError) as err:
    override(BASE, {"model.d_modle": "3"})
  message = str(err.value)
  assert "'model.d_modle'" in message and "did you mean model.d_model" in message
  assert "\n" not in message
  with pytest.raises(ConfigError, match="unknown config key 'model'"):
    override(BASE, {"model": "3"})  # a section is not a leaf


@pytest.mark.parametrize("key,text,message", [
    ("model.d_model", "abc", "model.d_model: cannot parse 'abc' as int"),
    ("model.d_model", "1.5", "model.d_model: cannot parse '1.5' as int"),
    ("train.lr", "fast", "train.lr: cannot parse 'fast' as float"),
    ("model.remat", "maybe", "model.remat: cannot parse 'maybe' as bool"),
    ("model.kv_layout", "0,x", "model.kv_layout: cannot parse 'x' as int"),
])
def test_bad_values_are_config_errors_naming_key_and_value(key, text, message):
  with pytest.raises(ConfigError) as err:
    override(BASE, {key: text})
  assert str(err.value) == message


def test_scientific_values_for_int_fields():
  assert override(BASE, {"model.d_model": "1e2"}).model.d_model == 100
  with pytest.raises(ConfigError, match="model.d_model: cannot parse '1.5e0' as int"):
    override(BASE, {"model.d_model": "1.5e0"})


def test_parse_value_optional_types():
  assert parse_value("none", int | None, "k") is None
  assert parse_value("7", int | None, "k") == 7
  assert parse_value("", str | None, "k") is None


def test_validate_checks_consistency_between_sections():
  ok = override(BASE, {"model.max_len": "256", "train.seq_len": "256"})
  assert ok.validate() is ok
  with pytest.raises(ConfigError, match="train.seq_len=512 exceeds model.max_len=256"):
    override(ok, {"train.seq_len": "512"}).validate()
  with pytest.raises(ConfigError, match="train.steps must be >= 1"):
    override(BASE, {"train.steps": "0"}).validate()
  with pytest.raises(ConfigError, match="train.loss='nope' is unknown; valid: lm"):
    override(BASE, {"train.loss": "nope"}).validate()
  with pytest.raises(ConfigError, match="mesh"):
    override(BASE, {"mesh.data": "-1"}).validate()  # two axes say 'all remaining devices'


def test_to_json_round_trips_values():
  cfg = override(BASE, {"model.kv_layout": "0,0,2,2", "train.lr": "1e-4"})
  data = json.loads(to_json(cfg))
  assert data["model"]["kv_layout"] == [0, 0, 2, 2] and data["train"]["lr"] == 1e-4
  assert set(data) == {"model", "train", "data", "mesh"}


@pytest.mark.parametrize("exp", ["lm", "cla", "mtp", "kan"])
def test_every_experiment_preset_is_a_valid_config(exp):
  presets = load(exp).PRESETS
  assert {"smoke", "default", "full"} <= set(presets)
  for preset in presets:
    get_config(exp, preset).validate()
  with pytest.raises(ConfigError, match=f"has no preset 'huge'; valid: {', '.join(presets)}"):
    get_config(exp, "huge")
  with pytest.raises(ConfigError, match="unknown experiment 'nope'; valid: lm, cla, mtp, kan"):
    get_config("nope", "smoke")

"""Config overrides from command-line text: ints, floats, bools, tuples, unknown keys; component
kinds chosen by name, their fields, and the fields of kinds not chosen."""

import dataclasses
import json

import pytest

from experiments import get_config, load
from jaxtricks import registry
from jaxtricks.config import Config, flag_defaults, flatten, override, parse_value, to_json
from jaxtricks.errors import ConfigError
from jaxtricks.layers.kan import KANMLPConfig
from jaxtricks.layers.mlp import SwiGLUConfig
from jaxtricks.layers.nm_projection import SlopeProjection
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.train.config import TrainConfig

BASE = Config()


def test_flatten_lists_every_leaf_with_a_dotted_key():
  keys = flatten(BASE)
  assert keys["model.d_model"] == 128 and keys["train.lr"] == 3e-3
  assert keys["mesh.fsdp"] == -1 and keys["data.corpus"] == "stdlib"
  assert keys["model.mlp"] == "swiglu" and keys["model.mlp.d_ff"] == 0
  assert keys["model.attention"] == "mha" and keys["model.attention.n_heads"] == 4
  components = BASE.model.components()
  plain = [f for f in dataclasses.fields(BASE.model) if f.name not in registry.SLOTS]
  assert len(keys) == (sum(len(dataclasses.fields(s)) for s in (BASE.train, BASE.data, BASE.mesh))
                       + len(plain) + len(components)
                       + sum(len(dataclasses.fields(c)) for c in components))


@pytest.mark.parametrize("key,text,expected", [
    ("model.d_model", "256", 256),
    ("train.steps", "2e3", 2000),
    ("mesh.fsdp", "-1", -1),
    ("train.lr", "3e-4", 3e-4),
    ("train.lr", "0.5", 0.5),
    ("train.lr", "2", 2.0),
    ("model.attention.rope_base", "1e6", 1e6),
    ("model.remat", "true", True),
    ("model.remat", "True", True),
    ("model.remat", "1", True),
    ("model.remat", "yes", True),
    ("model.remat", "off", False),
    ("model.remat", "false", False),
    ("model.attention.kv_layout", "0,0,2,2", (0, 0, 2, 2)),
    ("model.attention.kv_layout", "(0, 0, 2)", (0, 0, 2)),
    ("model.attention.kv_layout", "[0,1]", (0, 1)),
    ("model.attention.kv_layout", "()", ()),
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
  cfg = override(BASE, {"model.d_model": "64", "model.attention.n_heads": 2, "train.lr": 1e-3,
                        "model.attention.kv_layout": (0, 0)})
  assert (cfg.model.d_model, cfg.model.attention.n_heads, cfg.train.lr) == (64, 2, 1e-3)
  assert cfg.model.attention.kv_layout == (0, 0)
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
    ("model.attention.kv_layout", "0,x", "model.attention.kv_layout: cannot parse 'x' as int"),
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
  cfg = override(BASE, {"model.attention.kv_layout": "0,0,2,2", "train.lr": "1e-4"})
  data = json.loads(to_json(cfg))
  assert data["model"]["attention"]["kv_layout"] == [0, 0, 2, 2] and data["train"]["lr"] == 1e-4
  assert data["model"]["attention"]["kind"] == "mha" and data["model"]["mlp"]["kind"] == "swiglu"
  assert set(data) == {"model", "train", "data", "mesh"}


def test_a_kind_is_chosen_by_name_and_its_fields_set():
  cfg = override(BASE, {"model.mlp.grid": "7", "model.mlp": "kan", "model.mtp.heads": "3"})
  assert cfg.model.mlp == KANMLPConfig(grid=7)
  assert cfg.model.mtp.heads == 3 and cfg.model.mtp.kind == "transformer"
  assert override(cfg, {"model.mlp": "kan"}).model.mlp == KANMLPConfig(grid=7)  # kept
  assert override(cfg, {"model.mlp": "swiglu"}).model.mlp == SwiGLUConfig()  # its defaults
  wide = override(BASE, {"model.mlp.d_ff": "64", "model.mtp.heads": "4"})
  switched = override(wide, {"model.mlp": "kan", "model.mtp": "linear"})
  assert switched.model.mlp == KANMLPConfig(d_ff=64)  # the fields both kinds have are kept
  assert (switched.model.mtp.kind, switched.model.mtp.heads) == ("linear", 4)
  sparse = override(BASE, {"model.projection": "slope", "model.projection.targets": "attn"})
  assert sparse.model.projection == SlopeProjection(targets=("attn",))
  assert override(BASE, {"model.mlp": KANMLPConfig(order=2)}).model.mlp.order == 2


def test_a_field_of_another_kind_is_an_error_naming_the_chosen_kind():
  with pytest.raises(ConfigError) as err:
    override(BASE, {"model.mlp.grid": "5"})
  assert str(err.value) == ("model.mlp.grid is a field of model.mlp=kan, not of the chosen "
                            "model.mlp='swiglu'; choose it with --model.mlp=kan")
  with pytest.raises(ConfigError, match=r"model.projection.n is a field of "
                                        r"model.projection=slope/spp/srste, not of the chosen "
                                        r"model.projection='dense'"):
    override(BASE, {"model.projection.n": "1"})
  with pytest.raises(ConfigError, match=r"^model.mlp='moe' is unknown; valid: kan, swiglu$"):
    override(BASE, {"model.mlp": "moe"})


def test_flag_defaults_list_every_kind_s_fields():
  flags = flag_defaults(BASE)
  assert set(flatten(BASE)) < set(flags)
  assert flags["model.mlp"] == ("swiglu", " (one of kan, swiglu)")
  assert flags["model.mlp.grid"] == (5, " (with model.mlp=kan)")
  assert flags["model.projection.decay"] == (2e-4, " (with model.projection=srste)")
  assert flags["model.mlp.d_ff"] == (0, "")  # a field of the chosen kind
  for slot in registry.SLOTS:
    for kind, cls in registry.kinds(slot).items():
      for f in dataclasses.fields(cls):
        assert f"model.{slot}.{f.name}" in flags, (kind, f.name)


def test_each_component_validates_its_own_fields():
  cases = {
      "model.attention.n_heads": ("3", "model.attention.n_heads=3 does not divide model.d_model"),
      "model.mtp.heads": ("0", "model.mtp.heads=0 must be >= 1"),
      "model.mlp.d_ff": ("-1", "model.mlp.d_ff must be >= 0"),
  }
  for key, (text, message) in cases.items():
    with pytest.raises(ConfigError, match=message):
      override(BASE, {key: text}).validate()
  with pytest.raises(ConfigError, match="model.mlp.grid=0 must be >= 1"):
    override(BASE, {"model.mlp": "kan", "model.mlp.grid": "0"}).validate()
  with pytest.raises(ConfigError, match="model.projection.targets includes 'mlp' but model.mlp="):
    override(BASE, {"model.mlp": "kan", "model.projection": "slope"}).validate()
  with pytest.raises(ConfigError, match="the components remove 4 of model.n_layers=4 layers"):
    override(BASE, {"model.mtp.heads": "5", "model.mtp.compute_matched": "true",
                    "model.n_layers": "4"}).validate()


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

"""Experiment configs as nested frozen dataclasses, with dotted-key overrides.

An experiment's config is a `Config` (or a subclass adding the experiment's own fields) holding a
`ModelConfig`, `TrainConfig`, `DataConfig` and `MeshConfig`. Every leaf field has a dotted key
(`model.d_model`, `train.lr`) that the command line can override; values are parsed by the field's
annotated type. A component slot (jaxtricks.registry) is a key whose value is a kind
(`model.mlp=kan`), and the chosen kind's fields are keys below it (`model.mlp.grid=5`); the
fields of the other kinds are keys too (so `--help` lists them), and setting one is an error that
names the chosen kind. Choosing another kind keeps the fields the two kinds share.

This parser is kept over ml_collections' `config_flags` and fiddle: `config_flags` overrides
the fields of one fixed dataclass tree (a slot's kind cannot be chosen by name), and fiddle's
flags take a different command-line syntax than the `--model.d_model=...` contract.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from jaxtricks import registry
from jaxtricks.data.corpus import DataConfig
from jaxtricks.errors import ConfigError
from jaxtricks.models.config import ModelConfig
from jaxtricks.sharding import MeshConfig
from jaxtricks.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()

  def validate(self) -> Config:
    """Checks every section and the consistency between them; returns self."""
    for section in (self.model, self.train, self.data, self.mesh):
      section.validate()
    if self.model.max_len and self.train.seq_len > self.model.max_len:
      raise ConfigError(
          f"train.seq_len={self.train.seq_len} exceeds model.max_len={self.model.max_len}")
    return self


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """{'model.d_model': 128, 'model.mlp': 'swiglu', 'model.mlp.d_ff': 0, ...} for every leaf
  field of a nested dataclass; a component slot gives its kind and that kind's fields."""
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    key = f"{prefix}{f.name}"
    if registry.is_component(value):
      out[key] = value.kind
      out.update(flatten(value, key + "."))
    elif dataclasses.is_dataclass(value):
      out.update(flatten(value, key + "."))
    else:
      out[key] = value
  return out


def flag_defaults(cfg: Any) -> dict[str, tuple[Any, str]]:
  """{key: (default, note)} of every key the command line accepts: `flatten(cfg)`, and for each
  component slot the fields of its other kinds (at that kind's defaults)."""
  out = {key: (value, "") for key, value in flatten(cfg).items()}
  for key, component in _components(cfg):
    out[key] = (component.kind, f" (one of {', '.join(registry.kinds(component.slot))})")
    others: dict[str, tuple[Any, list[str]]] = {}
    for kind, cls in registry.kinds(component.slot).items():
      if kind != component.kind:
        for sub, value in flatten(cls(), key + ".").items():
          others.setdefault(sub, (value, []))[1].append(kind)
    for sub, (value, owners) in others.items():
      if sub not in out:
        out[sub] = (value, f" (with {key}={'/'.join(owners)})")
  return out


def _components(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if registry.is_component(value):
      out.append((prefix + f.name, value))
    if dataclasses.is_dataclass(value):
      out.extend(_components(value, f"{prefix}{f.name}."))
  return out


def to_dict(cfg: Any) -> dict[str, Any]:
  """Nested dicts of the fields; a component as {'kind': its kind, **its fields}."""
  out = {"kind": cfg.kind} if registry.is_component(cfg) else {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
  return out


def flatten_json(tree: dict, prefix: str = "") -> dict[str, Any]:
  """Nested dicts (what to_dict gives, read back from JSON) as {dotted key: value}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten_json(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def as_flat_json(cfg: Any) -> dict[str, Any]:
  """`flatten_json` of `to_dict(cfg)` as JSON gives it back (tuples as lists), for comparing a
  config with one read from config.json."""
  return flatten_json(json.loads(json.dumps(to_dict(cfg))))


def default_twin(cfg: Any) -> Any:
  """`cfg` with every field at its default, keeping the kind of every nested config and
  component: what a field added since a config was saved counts as."""
  nested = {f.name: default_twin(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, f.name))}
  return type(cfg)(**nested)


def changed_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """The keys, sorted, whose values differ between two flat configs (absent counts as None)."""
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def from_dict(cfg: Any, tree: dict, prefix: str = "") -> Any:
  """`cfg` with the fields that `to_dict` wrote into `tree` (under `prefix`, e.g. 'model.'), as
  read back from JSON: a component's 'kind' chooses the kind, lists become tuples."""
  updates = {}
  for key, value in flatten_json(tree, prefix).items():
    key = key[:-len(".kind")] if key.endswith(".kind") else key
    updates[key] = tuple(value) if isinstance(value, list) else value
  return override(cfg, updates)


def to_json(cfg: Any) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def field_type(cfg: Any, key: str) -> Any:
  """The annotated type of the dotted `key`."""
  *path, leaf = key.split(".")
  obj = cfg
  for name in path:
    obj = getattr(obj, name)
  return _field_types(type(obj))[leaf]


def parse_value(text: str, typ: Any, key: str) -> Any:
  """Parses command-line text into a value of the annotated type `typ`."""
  origin = typing.get_origin(typ)
  args = typing.get_args(typ)
  if origin in (typing.Union, types.UnionType):
    if text.lower() in ("none", "null", ""):
      if type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    return parse_value(text, inner[0], key)
  if origin is tuple:
    elem = args[0] if args else str
    items = [s.strip() for s in text.strip("()[] ").split(",") if s.strip()]
    return tuple(parse_value(s, elem, key) for s in items)
  try:
    if typ is bool:
      lowered = text.lower()
      if lowered in ("1", "true", "yes", "on"):
        return True
      if lowered in ("0", "false", "no", "off"):
        return False
      raise ValueError(text)
    if typ is int:
      if "e" in text.lower():  # 1e6 is an int; 1.5e0 is not
        value = float(text)
        if not value.is_integer():
          raise ValueError(text)
        return int(value)
      return int(text)
    if typ is float:
      return float(text)
    if typ is str:
      return text
  except ValueError:
    raise ConfigError(f"{key}: cannot parse {text!r} as {typ.__name__}") from None
  raise ConfigError(f"{key}: unsupported field type {typ}")


def override(cfg: Any, updates: dict[str, Any]) -> Any:
  """Returns `cfg` with dotted keys replaced; string values are parsed by field type. Component
  kinds are chosen first (a new kind keeps the fields it shares with the one it replaces, e.g.
  `heads` from one multi-token kind to another), then fields are set."""
  valid = flag_defaults(cfg)
  for key in updates:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3)
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      raise ConfigError(
          f"unknown config key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}")
  for key in sorted(updates, key=lambda k: k.count(".")):
    value = updates[key]
    *path, leaf = key.split(".")
    parent = _get(cfg, path)
    current = getattr(parent, leaf, None)
    if registry.is_component(current):
      value = _choose_kind(key, current, value)
    else:
      if registry.is_component(parent) and leaf not in {f.name for f in
                                                         dataclasses.fields(parent)}:
        slot_key = ".".join(path)
        owners = [k for k, cls in registry.kinds(parent.slot).items()
                  if leaf in {f.name for f in dataclasses.fields(cls)}]
        raise ConfigError(f"{key} is a field of {slot_key}={'/'.join(owners)}, not of the chosen "
                          f"{slot_key}={parent.kind!r}; choose it with --{slot_key}={owners[0]}")
      if isinstance(value, str):
        value = parse_value(value, field_type(cfg, key), key)
    cfg = _replace(cfg, key.split("."), value)
  return cfg


def _get(obj: Any, path: list[str]) -> Any:
  for name in path:
    obj = getattr(obj, name)
  return obj


def _choose_kind(key: str, current: Any, value: Any) -> Any:
  """The component for `--key=value`: `current` if it is of that kind, else the kind with the
  fields it shares with `current` (the rest at their defaults)."""
  if registry.is_component(value):
    return value
  table = registry.kinds(current.slot)
  if value not in table:
    raise ConfigError(f"{key}={value!r} is unknown; valid: {', '.join(table)}")
  if value == current.kind:
    return current
  cls = table[value]
  shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(current)}
  return cls(**{name: getattr(current, name) for name in shared})


def _replace(obj: Any, path: list[str], value: Any) -> Any:
  head, *rest = path
  if rest:
    value = _replace(getattr(obj, head), rest, value)
  return dataclasses.replace(obj, **{head: value})

"""Experiment configs as nested frozen dataclasses, with dotted-key overrides.

An experiment's config is a `Config` (or a subclass adding the experiment's own fields) holding a
`ModelConfig`, `TrainConfig`, `DataConfig` and `MeshConfig`. Every leaf field has a dotted key
(`model.d_model`, `train.lr`) that the command line can override; values are parsed by the field's
annotated type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from jaxtricks.data.corpus import DataConfig
from jaxtricks.errors import ConfigError
from jaxtricks.models.transformer import ModelConfig
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
  """{'model.d_model': 128, ...} for every leaf field of a nested dataclass."""
  out = {}
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    key = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(value):
      out.update(flatten(value, key + "."))
    else:
      out[key] = value
  return out


def to_dict(cfg: Any) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


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
  """Returns `cfg` with dotted keys replaced; string values are parsed by field type."""
  valid = flatten(cfg)
  for key in updates:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3)
      hint = f" (did you mean {', '.join(close)}?)" if close else ""
      raise ConfigError(
          f"unknown config key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}")
  for key, value in updates.items():
    if isinstance(value, str):
      value = parse_value(value, field_type(cfg, key), key)
    cfg = _replace(cfg, key.split("."), value)
  return cfg


def _replace(obj: Any, path: list[str], value: Any) -> Any:
  head, *rest = path
  if rest:
    value = _replace(getattr(obj, head), rest, value)
  return dataclasses.replace(obj, **{head: value})

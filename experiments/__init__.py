"""Experiment registry: `--exp=NAME` imports `experiments.NAME`.

An experiment module defines `PRESETS` (names), `get_config(preset) -> Config` and
`run(config, workdir) -> summary dict`, and its docstring gives the command and expected result.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from jaxtricks.errors import ConfigError

EXPERIMENTS = ("lm", "cla", "mtp", "kan", "slope", "finetune", "lckv", "linearity", "slab")


def load(name: str) -> ModuleType:
  if name not in EXPERIMENTS:
    raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
  return importlib.import_module(f"experiments.{name}")


def get_config(name: str, preset: str):
  module = load(name)
  if preset not in module.PRESETS:
    raise ConfigError(f"experiment {name!r} has no preset {preset!r}; valid: "
                      f"{', '.join(module.PRESETS)}")
  return module.get_config(preset)

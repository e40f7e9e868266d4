"""What the benchmarks share: the machine they ran on, their JSON output, the train step."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import app

from experiments import lm
from jaxtricks.config import Config
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.train.build import build
from jaxtricks.train.config import TrainConfig


def machine_info() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def configs() -> dict[str, Config]:
  """The `--exp=lm` default preset and a d_model=512 small LM (byte vocabulary)."""
  d512 = Config(model=ModelConfig(d_model=512, n_layers=6, attention=AttentionConfig(n_heads=8)),
                train=TrainConfig(batch_size=4, seq_len=256))
  return {"lm_default": lm.get_config("default"), "d512": d512}


def parse_overrides(pairs: list[str]) -> dict[str, str]:
  """`--set` entries key=value as config overrides (jaxtricks.config.override); a malformed
  entry is a usage error (one line from absl, no traceback)."""
  bad = [p for p in pairs if "=" not in p]
  if bad:
    raise app.UsageError(f"--set entries must be key=value, got {', '.join(bad)}")
  return dict(p.split("=", 1) for p in pairs)


def seconds(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def write_results(out: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {path}")


def train_step_runner(config) -> tuple[Callable[[], dict], Any]:
  """The jitted, sharded train step of `jaxtricks.train.build` (what the loop runs), on one
  fixed random batch: (one() -> that step's metrics, advancing the state; the initial
  parameters)."""
  tc = config.train
  built = build(config)
  state = built.init_state()
  step = built.train_step
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (tc.batch_size, tc.seq_len + 1), np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                         built.batch_sharding)
  box = {"state": state}

  def one() -> dict:
    box["state"], metrics = step(box["state"], batch)
    return metrics
  one.state = lambda: box["state"]  # the current train state, for memory measurements
  one.step, one.batch = step, batch  # for lowering the step (profiles)
  return one, state.params

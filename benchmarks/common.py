"""What the benchmarks share: the machine they ran on, their JSON output, the train step."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxtricks.train.build import build


def machine_info() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": jax.device_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


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
  return one, state.params

"""What every benchmark records: the machine it ran on, and its JSON written in one place."""

from __future__ import annotations

import json
import os
import platform

import jax


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

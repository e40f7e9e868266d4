"""Matplotlib figures (optional dependency: pip install 'jaxtricks[plot]')."""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(metrics_path: str, keys: Sequence[str], out_path: str,
                ylabel: str = "") -> str | None:
  """Plots each key of a metrics.jsonl against step; returns the PNG path (process 0 only)."""
  if jax.process_index() != 0:
    return None
  series: dict[str, tuple[list, list]] = {k: ([], []) for k in keys}
  with open(metrics_path) as f:
    for line in f:
      record = json.loads(line)
      for k in keys:
        if isinstance(record.get(k), (int, float)):
          series[k][0].append(record["step"])
          series[k][1].append(record[k])
  fig, ax = plt.subplots(figsize=(6, 4))
  for k, (steps, values) in series.items():
    if steps:
      ax.plot(steps, values, marker="o" if len(steps) < 5 else None, label=k)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path

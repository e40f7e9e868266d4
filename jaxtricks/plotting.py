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


def plot_labeled_points(points: Sequence[tuple[str, float, float]], out_path: str, xlabel: str,
                        ylabel: str, log2_x: bool = False) -> str | None:
  """A scatter of (label, x, y) points, each annotated; returns the PNG path (process 0 only)."""
  if jax.process_index() != 0:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, x, y in points:
    ax.scatter(x, y)
    ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  if log2_x:
    ax.set_xscale("log", base=2)
  return _finish(fig, ax, out_path, xlabel, ylabel, legend=False)


def plot_loglog(series: dict[str, tuple[Sequence[float], Sequence[float], str]], out_path: str,
                xlabel: str, ylabel: str) -> str | None:
  """Log-log curves {label: (x, y, matplotlib format)}; returns the PNG path (process 0 only)."""
  if jax.process_index() != 0:
    return None
  fig, ax = plt.subplots(figsize=(5, 4))
  for label, (x, y, fmt) in series.items():
    ax.loglog(x, y, fmt, label=label)
  return _finish(fig, ax, out_path, xlabel, ylabel, legend=True)


def _finish(fig, ax, out_path: str, xlabel: str, ylabel: str, legend: bool) -> str:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both")
  if legend:
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path

"""Matplotlib figures (optional dependency: pip install 'jaxtricks[plot]'): metric curves,
log-log ladders and KAN networks drawn with their learned edge curves (arXiv 2404.19756)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import matplotlib
import numpy as np

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
                xlabel: str, ylabel: str, log: bool = True) -> str | None:
  """Curves {label: (x, y, matplotlib format)} on log-log axes (linear ones with log=False);
  returns the PNG path (process 0 only)."""
  if jax.process_index() != 0:
    return None
  fig, ax = plt.subplots(figsize=(5, 4))
  for label, (x, y, fmt) in series.items():
    (ax.loglog if log else ax.plot)(x, y, fmt, label=label)
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


def edge_alphas(edge_scores_OxI: np.ndarray, beta: float = 3.0) -> np.ndarray:
  """pykan's edge opacity tanh(beta * score), clipped to [0, 1]."""
  return np.clip(np.tanh(beta * np.asarray(edge_scores_OxI, np.float64)), 0.0, 1.0)


def plot_kan(inputs: Sequence[np.ndarray], edges: Sequence[np.ndarray],
             edge_scores: Sequence[np.ndarray], out_path: str, beta: float = 3.0,
             in_names: Sequence[str] | None = None, out_names: Sequence[str] | None = None,
             title: str = "") -> str | None:
  """A KAN drawn as pykan draws it (Liu et al. 2024, arXiv 2404.19756, Fig. 2.4): nodes per layer
  from bottom to top, and for every edge (o, i) of layer l a small box with its learned curve
  phi_oi against x_i, linked to node i below and node o above, all with alpha = tanh(beta *
  score). Per layer: `inputs` (N, I) samples, `edges` (N, O, I) phi values, `edge_scores` (O, I)
  attribution scores. Returns the PNG path (process 0 only)."""
  if jax.process_index() != 0:
    return None
  widths = [np.shape(x)[1] for x in inputs] + [np.shape(edges[-1])[1]]
  n_layers = len(edges)
  n_boxes = max(int(np.prod(np.shape(e)[1:])) for e in edges)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n_boxes + 1), 2.6 * n_layers + 0.6))
  ax.set_xlim(0, 1)
  ax.set_ylim(-0.15, n_layers + 0.15)
  ax.axis("off")
  node_x = [(np.arange(w) + 0.5) / w for w in widths]
  for layer, w in enumerate(widths):
    ax.scatter(node_x[layer], np.full(w, float(layer)), s=60, c="k", zorder=3)
  for layer, (x_NxI, phi_NxOxI, score_OxI) in enumerate(zip(inputs, edges, edge_scores,
                                                            strict=True)):
    x_NxI, phi_NxOxI = np.asarray(x_NxI), np.asarray(phi_NxOxI)
    n_out, n_in = phi_NxOxI.shape[1:]
    alpha_OxI = edge_alphas(score_OxI, beta)
    size = min(0.8 / (n_in * n_out), 0.12)
    box_h = 0.34
    for i in range(n_in):
      order = np.argsort(x_NxI[:, i])
      for o in range(n_out):
        cx = (i * n_out + o + 0.5) / (n_in * n_out)
        y0 = layer + 0.5 - box_h / 2
        alpha = float(alpha_OxI[o, i])
        ax.plot([node_x[layer][i], cx], [layer, y0], "k-", lw=0.8, alpha=alpha)
        ax.plot([cx, node_x[layer + 1][o]], [y0 + box_h, layer + 1], "k-", lw=0.8, alpha=alpha)
        inset = ax.inset_axes([cx - size / 2, y0, size, box_h], transform=ax.transData)
        inset.plot(x_NxI[order, i], phi_NxOxI[order, o, i], "k-", lw=1.2, alpha=alpha)
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
          spine.set_alpha(alpha)
  for names, layer in ((in_names, 0), (out_names, n_layers)):
    for k, name in enumerate(names or []):
      dy = -0.1 if layer == 0 else 0.1
      ax.text(node_x[layer][k], layer + dy, name, ha="center", va="center", fontsize=11)
  if title:
    ax.set_title(title)
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path

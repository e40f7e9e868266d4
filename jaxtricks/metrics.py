"""Metric writers: JSONL lines (optionally mirrored to TensorBoard), the progress line, and JSON
summaries (process 0 only)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
from absl import logging


def is_writer() -> bool:
  return jax.process_index() == 0


def _clean(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class JsonlWriter:
  """Appends one JSON object per line; on resume, drops lines logged after the restored step.

  With `tensorboard`, every record also goes to an event file beside `path`, as scalars at the
  record's `step` (its other numeric fields), flushed at each write."""

  def __init__(self, path: str, resume_step: int | None = None, tensorboard: bool = False):
    self.path = path
    self.tensorboard = None
    if not is_writer():
      return
    if tensorboard:
      from jaxtricks.tensorboard import EventWriter  # noqa: PLC0415 (it imports this module)

      # Restarting at the first step not kept drops what earlier files logged from there on.
      self.tensorboard = EventWriter(os.path.dirname(path) or ".",
                                     restart_step=0 if resume_step is None else resume_step + 1)
    if resume_step is None:
      open(path, "w").close()
    elif os.path.exists(path):
      with open(path) as f:
        keep = [line.rstrip("\n") + "\n" for line in f
                if _step_of(line, path) <= resume_step]
      with open(f"{path}.tmp", "w") as f:  # atomic: a kill here must not lose the log
        f.writelines(keep)
      os.replace(f"{path}.tmp", path)

  def write(self, record: dict) -> None:
    if is_writer():
      with open(self.path, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
      if self.tensorboard:
        self.tensorboard.scalars(record.get("step", 0),
                                 {k: v for k, v in record.items() if k != "step"})
        self.tensorboard.flush()


def _step_of(line: str, path: str) -> float:
  """The step of a logged line; inf (dropped) for a blank or cut-off line, such as a process
  killed mid-write leaves behind."""
  if not line.strip():
    return math.inf
  try:
    return json.loads(line).get("step", 0)
  except json.JSONDecodeError:
    logging.warning("dropping a cut-off line of %s: %r", path, line[:80])
    return math.inf


def write_json(path: str, obj: Any) -> None:
  """Writes atomically (temporary file, then rename) so a crash never leaves half a file."""
  if not is_writer():
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_clean)
    f.write("\n")
  os.replace(tmp, path)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, metrics: dict, tokens_per_s: float | None,
                  eta_s: float | None) -> str:
  parts = [f"step {step}/{total}"]
  parts += [f"{k} {float(metrics[k]):.4g}" for k in ("loss", "grad_norm") if k in metrics]
  if tokens_per_s:
    parts += [f"{tokens_per_s / 1e3:.1f}k tok/s", f"ETA {format_duration(eta_s)}"]
  else:
    parts += ["compiled"]
  return " | ".join(parts)


def log_progress(line: str) -> None:
  if is_writer():
    logging.info(line)

"""Resume on a different topology: a checkpoint written by one mesh continued on another.

    python -m benchmarks.topology [--exp=lm] [--preset=smoke] [--steps=12]
                                  [--out=benchmarks/results/topology.json]

Trains the experiment's run uninterrupted on 1 and on 8 (fake CPU) devices, and on 8 devices to
half the steps; then resumes that half-way checkpoint on 1, 2, 4 and 8 devices (each a fresh
`launch.py` process: orbax restores into the new mesh's shardings). For each resume: the largest
absolute difference of the final train state (parameters and Adam moments) and of the logged
losses against the uninterrupted runs; float32 reductions in another order differ by rounding.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from jaxtricks import checkpoint

flags.DEFINE_string("exp", "lm", "experiment")
flags.DEFINE_string("preset", "smoke", "its preset")
flags.DEFINE_integer("steps", 12, "steps of every run (the half-way checkpoint at steps / 2)")
flags.DEFINE_string("out", "benchmarks/results/topology.json", "JSON output")
FLAGS = flags.FLAGS
REPO = pathlib.Path(__file__).resolve().parents[1]


def launch(workdir: pathlib.Path, devices: int, steps: int) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "launch.py", f"--exp={FLAGS.exp}", f"--preset={FLAGS.preset}",
         f"--steps={steps}", "--log_every=1", f"--ckpt_every={FLAGS.steps // 2}",
         f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def final_state(workdir: pathlib.Path) -> list[np.ndarray]:
  return [np.asarray(x) for x in
          jax.tree.leaves(checkpoint.read_numpy(workdir / "checkpoints", FLAGS.steps))]


def losses(workdir: pathlib.Path) -> np.ndarray:
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return np.array([r["loss"] for r in records if "loss" in r])


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
  return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
             for x, y in zip(a, b, strict=True))


def main(argv) -> None:
  del argv
  base = pathlib.Path(tempfile.mkdtemp(prefix="jaxtricks-topology-"))
  try:
    for devices in (1, 8):
      launch(base / f"uninterrupted{devices}", devices, FLAGS.steps)
    launch(base / "half8", 8, FLAGS.steps // 2)
    references = {d: (final_state(base / f"uninterrupted{d}"), losses(base / f"uninterrupted{d}"))
                  for d in (1, 8)}
    rows = []
    for devices in (1, 2, 4, 8):
      workdir = base / f"resume8to{devices}"
      shutil.copytree(base / "half8", workdir)
      launch(workdir, devices, FLAGS.steps)
      state, logged = final_state(workdir), losses(workdir)
      row = {"written_on": 8, "resumed_on": devices}
      for d, (ref_state, ref_losses) in references.items():
        row[f"state_max_abs_diff_vs_uninterrupted{d}"] = max_diff(state, ref_state)
        row[f"loss_max_abs_diff_vs_uninterrupted{d}"] = float(np.max(np.abs(logged - ref_losses)))
      rows.append(row)
    uninterrupted = max_diff(*(references[d][0] for d in (1, 8)))
  finally:
    shutil.rmtree(base, ignore_errors=True)
  print(f"{FLAGS.exp} --preset={FLAGS.preset}, {FLAGS.steps} steps, checkpoint of 8 devices at "
        f"step {FLAGS.steps // 2}: largest |difference| of the final state")
  print(f"{'resumed on':>10} {'vs 1 device':>12} {'vs 8 devices':>13} {'loss vs 1':>10}")
  for r in rows:
    print(f"{r['resumed_on']:>10} {r['state_max_abs_diff_vs_uninterrupted1']:>12.2e} "
          f"{r['state_max_abs_diff_vs_uninterrupted8']:>13.2e} "
          f"{r['loss_max_abs_diff_vs_uninterrupted1']:>10.2e}")
  print(f"uninterrupted 1 vs 8 devices: {uninterrupted:.2e}")
  common.write_results({"machine": common.machine_info(), "exp": FLAGS.exp,
                        "preset": FLAGS.preset, "steps": FLAGS.steps, "resumes": rows,
                        "uninterrupted_1_vs_8_state_max_abs_diff": uninterrupted}, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

"""Crash safety: SIGKILL a training run at random moments, rerun it each time, compare the end.

    python -m benchmarks.kill_resume [--kills=20] [--steps=120] [--ckpt_every=4] [--seed=0]
                                     [--out=benchmarks/results/kill_resume.json]

One uninterrupted `launch.py --exp=lm --preset=smoke` run gives the reference. Then the same
command is started in a fresh workdir and killed with SIGKILL `--kills` times, each time after a
random delay drawn uniformly from the moment its first progress line appears (compilation done) to
the time the reference needed to train 1.5 x steps / kills steps; every kill is followed by a rerun
of the same command, and the last rerun is left to finish. Checkpoints are asynchronous and
frequent (`--ckpt_every`), so kills land during steps and during checkpoint writes (a kill that
leaves an `*.orbax-checkpoint-tmp-*` folder behind interrupted a write).

A kill counts as resumed when the next run starts from the newest complete checkpoint left on disk
(or from scratch when there is none) and then trains. At the end the whole train state of the last
checkpoint (parameters, optimizer state, step, PRNG key) is compared bitwise with the reference's.
Prints a table and writes JSON.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks.common import machine_info, write_results
from jaxtricks.checkpoint import TMP_MARKER, read_numpy

flags.DEFINE_integer("kills", 20, "SIGKILLs across the run")
flags.DEFINE_integer("steps", 120, "training steps of the run")
flags.DEFINE_integer("ckpt_every", 4, "steps between (asynchronous) checkpoints")
flags.DEFINE_integer("seed", 0, "seed of the random kill times")
flags.DEFINE_string("out", "benchmarks/results/kill_resume.json", "JSON output path")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUMED = re.compile(r"resumed from .* at step (\d+)")


def _command(workdir: str) -> list[str]:
  return [sys.executable, "launch.py", "--exp=lm", "--preset=smoke", f"--steps={FLAGS.steps}",
          f"--ckpt_every={FLAGS.ckpt_every}", "--log_every=1", f"--workdir={workdir}"]


def _env(cache: str) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  return env


def _complete_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _unfinished(workdir: str) -> list[str]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(directory) if TMP_MARKER in n) if os.path.isdir(
      directory) else []


class Run:
  """One launch.py process whose stderr is read line by line."""

  def __init__(self, workdir: str, env: dict[str, str]):
    self.log = tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen(_command(workdir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=self.log, text=True)

  def text(self) -> str:
    self.log.seek(0)
    return self.log.read()

  def wait_for_training(self, timeout: float = 300) -> bool:
    """True once a progress line is out; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      if re.search(r"step \d+/", self.text()):
        return True
      if self.proc.poll() is not None:
        return False
      time.sleep(0.02)
    raise TimeoutError(self.text()[-2000:])


def _resumed_at(text: str) -> int:
  match = RESUMED.search(text)
  return int(match.group(1)) if match else 0


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines while reading the results
  rng = random.Random(FLAGS.seed)
  base = tempfile.mkdtemp(prefix="kill-resume-")
  env = _env(os.path.join(base, "xla-cache"))
  t0 = time.time()
  ref = Run(os.path.join(base, "reference"), env)
  ref.wait_for_training()
  t_train0 = time.time()
  assert ref.proc.wait() == 0, ref.text()[-3000:]
  reference_s = time.time() - t0
  train_s = time.time() - t_train0
  window = 1.5 * train_s / FLAGS.kills
  print(f"reference: {reference_s:.1f} s in all, {train_s:.1f} s of training; kills drawn "
        f"from [0, {window:.2f}] s after each run's first progress line")

  workdir = os.path.join(base, "killed")
  rows, pending = [], None
  kill = 0
  while True:
    run = Run(workdir, env)
    trained = run.wait_for_training()
    text = run.text()
    if pending is not None:  # the run after a kill: where did it start?
      pending["resumed_at"] = _resumed_at(text)
      pending["warnings"] = len(re.findall(r"incomplete or corrupted|unfinished checkpoint",
                                           text))
      expected = pending["newest_complete"]
      pending["resumed"] = trained and pending["resumed_at"] == expected
      rows.append(pending)
      pending = None
    if kill == FLAGS.kills or not trained:
      rc = run.proc.wait()
      break
    delay = rng.uniform(0, window)
    time.sleep(delay)
    if run.proc.poll() is not None:  # finished before the kill: count no kill, go on
      print(f"the run finished before kill {kill + 1} (raise --steps for more kills)")
      rc = run.proc.returncode
      break
    run.proc.kill()
    run.proc.wait()
    kill += 1
    steps = [int(s) for s in re.findall(r"step (\d+)/", run.text())]
    pending = {"kill": kill, "after_s": round(delay, 3), "last_logged_step": max(steps, default=0),
               "newest_complete": max(_complete_steps(workdir), default=0),
               "during_checkpoint_write": bool(_unfinished(workdir))}

  final_step = FLAGS.steps
  equal = None
  if rc == 0:
    a, b = (read_numpy(os.path.join(base, name, "checkpoints"), final_step)
            for name in ("reference", "killed"))
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    equal = ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y)
                             for x, y in zip(la, lb, strict=True))
  resumed = sum(r["resumed"] for r in rows)
  print(f"\n{'kill':>4} {'after s':>8} {'last step':>9} {'newest ckpt':>11} {'in write':>8} "
        f"{'resumed at':>10} {'warnings':>8} {'ok':>3}")
  for r in rows:
    print(f"{r['kill']:>4} {r['after_s']:>8.3f} {r['last_logged_step']:>9} "
          f"{r['newest_complete']:>11} {str(r['during_checkpoint_write']):>8} "
          f"{r['resumed_at']:>10} {r['warnings']:>8} {'yes' if r['resumed'] else 'NO':>3}")
  print(f"\nkills: {len(rows)}, resumed from the newest complete checkpoint: {resumed}, "
        f"during a checkpoint write: {sum(r['during_checkpoint_write'] for r in rows)}; final run "
        f"exit {rc}; final state bitwise equal to the uninterrupted run: {equal}")
  out = {"kills": len(rows), "resumed": resumed, "bitwise_equal": equal, "final_exit": rc,
         "steps": FLAGS.steps, "ckpt_every": FLAGS.ckpt_every, "seed": FLAGS.seed,
         "kill_window_s": window, "reference_s": reference_s, "wall_s": time.time() - t0,
         "command": " ".join(_command("WORKDIR")[1:]), "rows": rows, "machine": machine_info()}
  write_results(out, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

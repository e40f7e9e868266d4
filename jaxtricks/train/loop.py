"""The training loop: data -> jit train step -> metrics, evaluation and checkpoints -> summary.

Tricks never change this file: they change the model (config.model), the loss (config.train.loss)
or what an experiment does with the result.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxtricks import metrics as mlog
from jaxtricks import sharding
from jaxtricks.checkpoint import Checkpointer, abstract_with_shardings
from jaxtricks.config import (
  Config,
  as_flat_json,
  changed_keys,
  default_twin,
  flatten,
  flatten_json,
  to_dict,
)
from jaxtricks.data.corpus import Corpus
from jaxtricks.data.sources import make_source
from jaxtricks.errors import ConfigError, UserError
from jaxtricks.models.transformer import Transformer
from jaxtricks.train import init_from
from jaxtricks.train import step as step_lib
from jaxtricks.train.build import build
from jaxtricks.train.state import TrainState, count_params


class NonFiniteLoss(UserError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


class WorkdirError(UserError):
  """The workdir cannot be written or has no room for a checkpoint."""


class Preempted(Exception):  # noqa: N818 (not an error: launch.py exits 0)
  """SIGTERM or the cluster's preemption notice arrived; a checkpoint was saved at `step`."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved a checkpoint at step {step} in {directory}; rerun the "
                     "same command to resume")
    self.step = step


class _PreemptionWatch:
  """Notices a preemption request at a step boundary. One process: a SIGTERM handler sets a flag.
  Several: JAX's preemption sync point (which listens for SIGTERM itself, as on TPU pods) picks
  a step at which every process saves."""

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._previous = None

  def __enter__(self) -> _PreemptionWatch:
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_sigterm(self, signum, frame) -> None:
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that cannot be written (read-only, full) before anything is touched."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
    try:
      os.write(fd, b"0")
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def check_free_space(workdir: str, abstract_state: Any) -> None:
  """A checkpoint needs about the state's size on disk; ask for twice that, to save safely."""
  need = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise WorkdirError(f"workdir {workdir} has {free / 2**20:.1f} MiB free; checkpoints of this "
                       f"model need about {need / 2**20:.1f} MiB")


@dataclasses.dataclass
class RunResult:
  state: TrainState
  model: Transformer
  summary: dict[str, Any]
  source: Any                 # jaxtricks.data.sources: the corpus or a synthetic task
  mesh: jax.sharding.Mesh

  @property
  def corpus(self) -> Corpus | None:
    return getattr(self.source, "corpus", None)


def _to_global(batch: dict[str, np.ndarray], data_sharding, global_rows: int) -> dict:
  return {k: jax.make_array_from_process_local_data(data_sharding, v, (global_rows, *v.shape[1:]))
          for k, v in batch.items()}


def check_resumable(workdir: str, config: Config) -> None:
  """Refuses to resume a checkpoint written for a different model config, or in the flat model
  config format of jaxtricks before components (model.n_heads, model.mtp_heads, ...)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f).get("model", {})
  if not isinstance(saved.get("attention"), dict):
    raise ConfigError(f"{workdir} was written by an older jaxtricks (a flat model config, before "
                      "components); this version cannot resume it: use another --workdir or "
                      "delete it")
  model = config.model
  # A field added since the checkpoint was written is fine at its default (of the same kind).
  current, defaults = as_flat_json(model), as_flat_json(default_twin(model))
  saved = flatten_json(saved)
  saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
  diff = changed_keys(saved, current)
  if diff:
    changes = ", ".join(f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
    raise ConfigError(f"{workdir} holds checkpoints of a different model ({changes}); use "
                      "another --workdir or delete it")


def evaluate(eval_step, state, batches: list[dict]) -> dict[str, float]:
  params, collections = state.model_params(), state.model_collections()
  return step_lib.mean_metrics([eval_step(params, b, collections) for b in batches])


def train(config: Config, workdir: str, exp: str = "lm") -> RunResult:
  """Trains (or resumes) the model of `config` in `workdir`; returns the state and summary.

  Raises Preempted after saving a checkpoint when SIGTERM arrives (from the start of this call,
  compilation included); NonFiniteLoss on a NaN/inf loss unless train.skip_nonfinite."""
  with _PreemptionWatch() as watch:
    return _train(config, workdir, exp, watch)


def _train(config: Config, workdir: str, exp: str, watch: _PreemptionWatch) -> RunResult:
  t_start = time.time()
  built = build(config)
  tc, mesh, model, shardings = config.train, built.mesh, built.model, built.shardings
  pretrained = init_from.check(config, workdir) if tc.init_from else None
  source = make_source(config.data, tc.seq_len)
  check_workdir(workdir)
  check_free_space(workdir, built.abstract_state)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints,
                      tc.async_checkpoints)
  try:
    if ckpt.all_steps():
      check_resumable(workdir, config)
    restored = ckpt.restore_latest(abstract_with_shardings(built.abstract_state, shardings))
    resumed = restored is not None
    start = 0
    if resumed:
      start, state, meta = restored
      if meta.get("seed") != tc.seed:
        logging.warning("resuming a run started with seed %s under seed %s", meta.get("seed"),
                        tc.seed)
      logging.info("resumed from %s at step %d", ckpt.directory, start)
    else:
      loaded = None if pretrained is None else init_from.load(pretrained, built)
      state = built.init_state(loaded=loaded)
      if pretrained is not None:
        logging.info("initialised from %s, step %d", pretrained.directory, pretrained.step)
    mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp=exp))
    writer = mlog.JsonlWriter(os.path.join(workdir, "metrics.jsonl"),
                             resume_step=start if resumed else None, tensorboard=tc.tensorboard)
    n_params = count_params(state.model_params())
    n_trainable = count_params(state.params)
    logging.info("%s: %s parameters (%s trained), mesh %s, %d devices, %d processes", exp,
                 f"{n_params:,}", f"{n_trainable:,}", dict(mesh.shape), jax.device_count(),
                 jax.process_count())

    data_sharding = sharding.batch_sharding(mesh)
    pid, pcount = jax.process_index(), jax.process_count()
    train_step, eval_step = built.train_step, built.eval_step
    val = [_to_global(b, data_sharding, tc.batch_size)
           for b in source.eval_batches(tc.seq_len, tc.batch_size, tc.eval_batches, pid, pcount)]
  except BaseException:
    # A user error before the loop (another model's checkpoints, a full disk) still closes the
    # manager: its background cleanup thread would otherwise print a traceback at exit.
    ckpt.close()
    raise

  tokens_per_step = tc.batch_size * tc.seq_len
  recent = collections.deque(maxlen=max(1, min(tc.log_every or 1, 50)))
  last_good = start
  skipped: list[int] = []
  clock = {"t0": None, "steps0": 0, "t_log": time.time(), "n_log": 0}

  def handle(done: int, metrics: dict) -> None:
    values = {k: float(v) for k, v in metrics.items()}
    bad = not math.isfinite(values["loss"]) or values.get("skipped", 0) > 0
    if bad and not tc.skip_nonfinite:
      kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt.directory}"
              if last_good else "no checkpoint had been saved")
      raise NonFiniteLoss(f"loss is {values['loss']} at step {done}; training stopped and {kept}")
    if bad:
      skipped.append(done)
      logging.warning("step %d: loss %s, grad_norm %s; batch skipped, update discarded "
                      "(train.skip_nonfinite)", done, values["loss"], values["grad_norm"])
    else:
      recent.append(values["loss"])
    now = time.time()
    first = done == start + 1  # includes compilation: throughput is timed from its end
    if first:
      clock["t0"], clock["steps0"], clock["t_log"], clock["n_log"] = now, done, now, 0
    else:
      clock["n_log"] += 1
    if ((tc.log_every and done % tc.log_every == 0) or done == tc.steps or first) and not bad:
      tps = clock["n_log"] * tokens_per_step / (now - clock["t_log"]) if clock["n_log"] else None
      clock["t_log"], clock["n_log"] = now, 0
      eta = (tc.steps - done) * tokens_per_step / tps if tps else None
      mlog.log_progress(mlog.progress_line(done, tc.steps, values, tps, eta))
      writer.write(dict(step=done, tokens_per_s=tps, elapsed_s=now - t_start, **values))

  def save(done: int) -> None:
    nonlocal last_good
    meta = {"step": done, "data_step": done, "seed": tc.seed, "exp": exp}
    ckpt.save(done, state, meta, force=True)
    last_good = done

  pending = None
  preempted = False
  try:
    for s in range(start, tc.steps):
      batch = _to_global(source.train_batch(tc.seed, s, tc.batch_size, tc.seq_len, pid,
                                            pcount), data_sharding, tc.batch_size)
      state, metrics = train_step(state, batch)
      if pending is not None:
        handle(*pending)  # read step s-1's metrics only after step s is dispatched
      pending, done = (s + 1, metrics), s + 1
      preempted = watch.reached(done) and done != tc.steps
      if (tc.ckpt_every and done % tc.ckpt_every == 0) or done == tc.steps or preempted:
        handle(*pending)
        pending = None
        save(done)
      if preempted:
        break
      if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
        val_metrics = evaluate(eval_step, state, val)
        writer.write(dict(step=done, **{f"val_{k}": v for k, v in val_metrics.items()}))
    if pending is not None:
      handle(*pending)
    jax.block_until_ready(state)
  finally:
    ckpt.wait()  # an error must not leave a half-written checkpoint behind
    ckpt.close()
  if preempted:
    raise Preempted(last_good, ckpt.directory)
  t_end = time.time()

  final = evaluate(eval_step, state, val)
  if start < tc.steps:  # a rerun of a finished run has logged its final evaluation already
    writer.write(dict(step=tc.steps, **{f"val_{k}": v for k, v in final.items()}))
  if not recent:  # resumed a finished run: take the last train loss from its log
    recent.append(_last_logged(writer.path, "loss"))
  trained = tc.steps - clock["steps0"] if clock["t0"] else 0
  summary = {
      "exp": exp,
      "steps": tc.steps,
      "params": n_params,
      "trainable_params": n_trainable,
      "final_train_loss": recent[-1],
      "val_loss": final["loss"],
      "val_bits_per_byte": final["loss"] / math.log(2),
      "val_accuracy": final["accuracy"],
      "val_metrics": final,
      "tokens_per_s": trained * tokens_per_step / (t_end - clock["t0"]) if trained else None,
      "wall_s": time.time() - t_start,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "config": flatten(config),
  }
  if tc.skip_nonfinite:
    summary["skipped_steps"] = skipped
  return RunResult(state, model, summary, source, mesh)


def _last_logged(path: str, key: str) -> float | None:
  value = None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        value = record.get(key, value)
  return value

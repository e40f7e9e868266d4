"""Surviving faults: SIGTERM saves and exits 0, SIGKILL and damaged checkpoints resume from the
newest readable checkpoint bitwise equal to an uninterrupted run, a full workdir is refused, and a
non-finite step can be skipped inside the jitted step."""

import dataclasses
import logging
import os
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtricks import checkpoint, sharding
from jaxtricks.config import Config
from jaxtricks.data.corpus import DataConfig
from jaxtricks.errors import UserError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.metrics import JsonlWriter
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.sharding import MeshConfig
from jaxtricks.train import loop
from jaxtricks.train import step as step_lib
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.losses import LOSSES
from jaxtricks.train.state import init_state, state_shardings
from tests import support

STEPS = 6


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  corpus = support.write_text_corpus(tmp_path_factory.mktemp("corpus"))
  return Config(
      model=ModelConfig(d_model=32, n_layers=1, attention=AttentionConfig(n_heads=2)),
      train=TrainConfig(steps=STEPS, batch_size=4, seq_len=16, warmup_steps=1, log_every=1,
                        ckpt_every=2, eval_batches=1),
      data=DataConfig(corpus=corpus, val_fraction=0.2))


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
  """The uninterrupted run: its workdir and final state as numpy."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = loop.train(config, str(workdir))
  return workdir, jax.tree.map(np.asarray, result.state)


def _final_state(config, workdir):
  return jax.tree.map(np.asarray, loop.train(config, str(workdir)).state)


class _Poisoned:
  """A source whose batch of step `at` calls `action(batch)` (send a signal, poison the data)."""

  def __init__(self, source, at: int, action):
    self.source, self.at, self.action = source, at, action

  def __getattr__(self, name):
    return getattr(self.source, name)

  def train_batch(self, seed, step, *args):
    batch = self.source.train_batch(seed, step, *args)
    return self.action(batch) if step == self.at else batch


def _with_source(monkeypatch, at, action):
  make = loop.make_source
  monkeypatch.setattr(loop, "make_source", lambda *a: _Poisoned(make(*a), at, action))


def test_sigterm_saves_at_the_next_step_boundary_and_rerun_resumes_bitwise(
    config, reference, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  handler = signal.getsignal(signal.SIGTERM)

  def sigterm(batch):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 is prepared (index 2)
    return batch

  _with_source(monkeypatch, 2, sigterm)
  with pytest.raises(loop.Preempted) as err:
    loop.train(config, str(workdir))
  assert err.value.step == 3
  assert str(err.value).startswith("preempted: saved a checkpoint at step 3 in ")
  assert "rerun the same command to resume" in str(err.value)
  assert support.checkpoint_steps(workdir) == [2, 3]
  assert signal.getsignal(signal.SIGTERM) is handler  # the loop's handler is removed again
  monkeypatch.undo()
  assert support.arrays_equal(_final_state(config, workdir), reference[1])


def test_damaged_newest_checkpoint_is_skipped_with_a_warning_and_kept_aside(
    config, reference, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  ckpt_dir = workdir / "checkpoints"
  assert support.checkpoint_steps(workdir) == [4, 6]
  for f in (ckpt_dir / "6" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])  # cut every data file short
  interrupted = ckpt_dir / "8.orbax-checkpoint-tmp"  # a save killed before its rename
  shutil.copytree(ckpt_dir / "4", interrupted)
  with caplog.at_level(logging.WARNING):
    state = _final_state(config, workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any(f"checkpoint {ckpt_dir / '6'} is incomplete or corrupted" in w for w in warnings)
  assert any(f"unfinished checkpoint {interrupted}" in w for w in warnings)
  assert not interrupted.exists()
  assert (ckpt_dir / "6.corrupt").is_dir()  # set aside, not deleted
  assert support.checkpoint_steps(workdir) == [4, 6]
  assert support.arrays_equal(state, reference[1])


def test_no_readable_checkpoint_is_an_error_that_renames_nothing(config, reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  for step in (4, 6):
    shutil.rmtree(workdir / "checkpoints" / str(step) / "state")
  before = support.file_digests(workdir / "checkpoints")
  with pytest.raises(UserError, match=r"no checkpoint in .* can be restored \(newest: step 6"):
    loop.train(config, str(workdir))
  assert support.file_digests(workdir / "checkpoints") == before


def test_full_workdir_is_refused_before_anything_is_written(config, reference, tmp_path,
                                                            monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  before = support.file_digests(workdir)
  monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: types.SimpleNamespace(
      total=10 << 30, used=10 << 30, free=1 << 16))  # 64 KiB left
  with pytest.raises(loop.WorkdirError, match=r"has 0\.1 MiB free; checkpoints of this model "
                     r"need about [0-9.]+ MiB"):
    loop.train(config, str(workdir))
  assert support.file_digests(workdir) == before


def test_metrics_log_cut_off_by_a_kill_is_repaired_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  writer = JsonlWriter(str(path), resume_step=2)
  writer.write({"step": 3, "loss": 1.0})
  assert support.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
                                      {"step": 3, "loss": 1.0}]


def _poison(batch):
  return dict(batch, inputs=np.full_like(batch["inputs"], 10_000))  # out of the vocabulary: NaN


def test_skip_nonfinite_step_keeps_params_and_optimizer_state(config):
  model = Transformer(config.model)
  tc = dataclasses.replace(config.train, warmup_steps=0)
  tx = optax.adam(1e-2)
  _, shardings = state_shardings(model, tx, tc.seq_len, sharding.make_mesh(MeshConfig()))
  state = init_state(model, tx, tc.seq_len, 0, shardings)
  step = jax.jit(step_lib.make_train_step(model, tx, LOSSES["lm"], lambda s: 1e-2,
                                          skip_nonfinite=True))
  tokens = np.arange(4 * tc.seq_len, dtype=np.int32).reshape(4, -1) % 256
  good = {"inputs": tokens, "targets": tokens}
  before = jax.tree.map(np.asarray, state)
  bad_state, bad = step(state, _poison(good))
  assert not np.isfinite(float(bad["loss"])) and float(bad["skipped"]) == 1.0
  assert int(bad_state.step) == 1
  assert support.arrays_equal(jax.tree.map(np.asarray, bad_state.params), before.params)
  assert support.arrays_equal(jax.tree.map(np.asarray, bad_state.opt_state), before.opt_state)
  good_state, ok = step(bad_state, good)
  assert np.isfinite(float(ok["loss"])) and float(ok["skipped"]) == 0.0
  assert int(good_state.step) == 2
  assert not support.arrays_equal(jax.tree.map(np.asarray, good_state.params), before.params)
  assert jnp.all(jnp.isfinite(good_state.params["embed"]["embedding"]))


def test_skip_nonfinite_option_skips_the_bad_batch_and_warns(config, tmp_path, monkeypatch,
                                                              caplog):
  _with_source(monkeypatch, 3, _poison)  # the batch of step 4
  skipping = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                   skip_nonfinite=True))
  with caplog.at_level(logging.WARNING):
    result = loop.train(skipping, str(tmp_path / "run"))
  assert result.summary["skipped_steps"] == [4]
  assert any(r.getMessage().startswith("step 4: loss nan") and "batch skipped" in r.getMessage()
             for r in caplog.records)
  assert np.isfinite(result.summary["final_train_loss"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(result.state.params))
  logged = [r["step"] for r in support.train_records(
      support.read_jsonl(tmp_path / "run" / "metrics.jsonl"))]
  assert logged == [1, 2, 3, 5, 6]


def test_without_the_option_a_bad_batch_stops_at_its_step(config, tmp_path, monkeypatch):
  _with_source(monkeypatch, 3, _poison)
  with pytest.raises(loop.NonFiniteLoss, match=r"loss is nan at step 4; training stopped and "
                     r"the last good checkpoint \(step 2\) is kept"):
    loop.train(config, str(tmp_path / "run"))
  assert support.checkpoint_steps(tmp_path / "run") == [2]


# ---- end to end, through launch.py (subprocesses)


@pytest.mark.slow  # the slow tier: a long training run
def test_sigkill_during_a_checkpoint_write_then_rerun_equals_the_uninterrupted_run(
    smoke_run, tmp_path):
  """Killed right as step 3's checkpoint starts its asynchronous write; the same command run
  again finishes with parameters bitwise equal to the shared smoke run's."""
  flags = [f for f in smoke_run.flags if not f.startswith("--workdir=")]
  flags.append(f"--workdir={tmp_path / 'run'}")
  proc = support.launch_process(*flags)
  try:
    support.wait_for_line(proc, "step 3/6")
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  rerun = support.launch(*flags)
  assert rerun.returncode == 0, support.describe(rerun)
  final = checkpoint.read_numpy(tmp_path / "run" / "checkpoints", 6)
  expected = checkpoint.read_numpy(smoke_run.workdir / "checkpoints", 6)
  assert support.arrays_equal(final, expected)
  records = support.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert support.duplicated_steps(records) == []
  assert [r["step"] for r in support.train_records(records)] == [1, 2, 3, 4, 5, 6]


def test_sigterm_exits_0_with_a_message(tmp_path):
  """launch.py end to end (resuming after SIGTERM: the in-process test above)."""
  workdir = tmp_path / "run"
  flags = ["--exp=lm", "--preset=smoke", "--steps=5000", "--log_every=1", "--ckpt_every=0",
           f"--workdir={workdir}"]
  proc = support.launch_process(*flags)
  try:
    support.wait_for_line(proc, "step 1/5000")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()  # only if it is still running after a failure
  assert proc.returncode == 0, stderr[-3000:]
  line = stderr.rstrip().splitlines()[-1]
  assert line.startswith("preempted: saved a checkpoint at step ") and "rerun the same" in line
  step = int(line.split("at step ")[1].split()[0])
  assert support.checkpoint_steps(workdir) == [step] and 1 < step < 5000
  assert not (workdir / "summary.json").exists()

"""Multi-process training on one machine: two launch.py processes on loopback, each with half the
fake CPU devices (collectives through gloo), against one process with all of them: the same
losses within 1e-5 relative, one writer of metrics and summaries, one checkpoint written by both,
which one process then resumes on one device."""

import json
import signal

import jax
import numpy as np
import pytest

from experiments import get_config
from jaxtricks import checkpoint
from jaxtricks.config import override
from jaxtricks.train.loop import train
from tests import sharded_runs, support

pytestmark = pytest.mark.slow  # the slow tier (--runslow): four processes, about 40 s

RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fake_devices):
  base = tmp_path_factory.mktemp("distributed")
  half = fake_devices // 2
  one = support.launch(*support.SMOKE_FLAGS, f"--workdir={base / 'one'}", devices=fake_devices)
  assert one.returncode == 0, support.describe(one)
  address = f"127.0.0.1:{support.free_port()}"
  # Process 0 by flags, process 1 by the environment variables: both ways are exercised.
  procs = [
      support.launch_process(*support.SMOKE_FLAGS, f"--workdir={base / 'two'}",
                             f"--coordinator_address={address}", "--num_processes=2",
                             "--process_id=0", devices=half),
      support.launch_process(*support.SMOKE_FLAGS, f"--workdir={base / 'two'}", devices=half,
                             env={"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": "1"}),
  ]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()  # only if one is still running after a failure
  for p, (out, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
  return base, one, outputs


def test_two_processes_give_the_single_process_losses(runs, fake_devices):
  base, _, _ = runs
  one, two = (support.read_jsonl(base / name / "metrics.jsonl") for name in ("one", "two"))
  assert [r["step"] for r in support.train_records(two)] == [1, 2, 3, 4, 5, 6]
  assert support.duplicated_steps(two) == []  # process 1 wrote nothing
  for key, select in (("loss", support.train_records), ("grad_norm", support.train_records),
                      ("val_loss", support.val_records)):
    a = np.array([r[key] for r in select(one)])
    b = np.array([r[key] for r in select(two)])
    np.testing.assert_allclose(b, a, rtol=RTOL, err_msg=key)
  summary = json.loads((base / "two" / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["devices"] == fake_devices
  assert json.loads((base / "one" / "summary.json").read_text())["processes"] == 1


def test_only_process_0_logs_progress_and_both_print_the_summary(runs):
  _, _, ((out0, err0), (out1, err1)) = runs
  assert "step 6/6" in err0 and "step " not in err1.replace("steps", "")
  printed = [json.loads(out[out.index("{"):]) for out in (out0, out1)]  # after gloo's lines
  timing = ("wall_s", "tokens_per_s")
  assert [{k: v for k, v in p.items() if k not in timing} for p in printed] == \
         [{k: v for k, v in printed[0].items() if k not in timing}] * 2
  assert printed[0]["processes"] == 2


def test_checkpoint_written_collectively_matches_the_single_process_one(runs):
  base, _, _ = runs
  assert support.checkpoint_steps(base / "two") == support.checkpoint_steps(base / "one") == [3, 6]
  a, b = (jax.tree_util.tree_flatten_with_path(checkpoint.read_numpy(base / name / "checkpoints",
                                                                    6))[0]
          for name in ("one", "two"))
  assert [path for path, _ in a] == [path for path, _ in b] and len(a) > 10
  for (path, x), (_, y) in zip(a, b, strict=True):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_sigterm_to_one_process_saves_on_both_at_one_step(tmp_path, fake_devices):
  """JAX's preemption sync point: process 1 gets SIGTERM, both save the same step and exit 0."""
  address = f"127.0.0.1:{support.free_port()}"
  flags = ("--exp=lm", "--preset=smoke", "--steps=5000", "--log_every=1", "--ckpt_every=0",
           f"--workdir={tmp_path / 'run'}", f"--coordinator_address={address}",
           "--num_processes=2")
  procs = [support.launch_process(*flags, f"--process_id={i}", devices=fake_devices // 2)
           for i in range(2)]
  try:
    support.wait_for_line(procs[0], "step 2/5000")
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  lines = []
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
    lines.append(err.rstrip().splitlines()[-1])
  assert lines[0] == lines[1] and lines[0].startswith("preempted: saved a checkpoint at step ")
  step = int(lines[0].split("at step ")[1].split()[0])
  assert support.checkpoint_steps(tmp_path / "run") == [step] and 2 < step < 5000


def test_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path):
  """A topology change: the two processes' step-3 checkpoint continued by one process on one
  device gives the 8-device run's losses and final state."""
  base, _, _ = runs
  resumed = tmp_path / "two_to_one"
  sharded_runs.resume_elsewhere(base / "two", resumed, step=3)
  result = train(override(get_config("lm", "smoke"), support.SMOKE_OVERRIDES), str(resumed))
  assert result.summary["processes"] == 1 and result.summary["devices"] == 1
  support.assert_resumed_like_uninterrupted(resumed, base / "one")

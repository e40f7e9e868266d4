"""Multi-process training on one machine: two launch.py processes on loopback, each with 4 CPU
devices (collectives through gloo), against one process with 8 devices: the same losses within
1e-5 relative, one writer of metrics and summaries, and one checkpoint written by both."""

import json
import signal

import jax
import numpy as np
import pytest

from jaxtricks import checkpoint
from tests import support

RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("distributed")
  one = support.launch(*support.SMOKE_FLAGS, f"--workdir={base / 'one'}", devices=8)
  assert one.returncode == 0, support.describe(one)
  address = f"127.0.0.1:{support.free_port()}"
  # Process 0 by flags, process 1 by the environment variables: both ways are exercised.
  procs = [
      support.launch_process(*support.SMOKE_FLAGS, f"--workdir={base / 'two'}",
                             f"--coordinator_address={address}", "--num_processes=2",
                             "--process_id=0", devices=4),
      support.launch_process(*support.SMOKE_FLAGS, f"--workdir={base / 'two'}", devices=4,
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


def test_two_processes_give_the_single_process_losses(runs):
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
  assert summary["processes"] == 2 and summary["devices"] == 8
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


@pytest.mark.slow
def test_sigterm_to_one_process_saves_on_both_at_one_step(tmp_path):
  """JAX's preemption sync point: process 1 gets SIGTERM, both save the same step and exit 0."""
  address = f"127.0.0.1:{support.free_port()}"
  flags = ("--exp=lm", "--preset=smoke", "--steps=5000", "--log_every=1", "--ckpt_every=0",
           f"--workdir={tmp_path / 'run'}", f"--coordinator_address={address}",
           "--num_processes=2")
  procs = [support.launch_process(*flags, f"--process_id={i}", devices=4) for i in range(2)]
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

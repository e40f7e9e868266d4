"""`python launch.py --exp=mtp --preset=smoke` end to end: the summary keys of the issue, the
per-head figure, and greedy self-speculative output identical to greedy decoding."""

import json

import pytest

from experiments import mtp
from tests import support


@pytest.fixture(scope="module")
def mtp_smoke(mtp_smoke_run):
  return mtp_smoke_run.workdir, mtp_smoke_run.summary


def test_summary_holds_the_documented_keys(mtp_smoke):
  workdir, summary = mtp_smoke
  support.assert_readme_summary_keys(summary, "mtp", absent_ok=("runs",))  # runs: compare
  n = summary["heads"]
  assert n == 4 and summary["exp"] == "mtp"
  assert len(summary["val_loss_per_head"]) == len(summary["val_acc_per_head"]) == n
  assert all(0 < x < 10 for x in summary["val_loss_per_head"])
  assert all(0 <= x <= 1 for x in summary["val_acc_per_head"])
  spec = summary["spec"]
  assert set(spec) >= {"tokens_per_forward", "acceptance_per_position", "speedup_vs_greedy",
                       "identical_to_greedy"}
  assert spec["identical_to_greedy"] is True
  assert 1.0 <= spec["tokens_per_forward"] <= n
  assert len(spec["acceptance_per_position"]) == n - 1
  assert spec["speedup_vs_greedy"] > 0
  assert spec["batch1"]["prompts"] == spec["prompts"] == 2  # each prompt alone, in turn
  assert spec["batch1"]["identical_to_greedy"] is True
  mem = summary["mem"]
  assert 0 < mem["loss_temp_bytes_efficient"] < mem["loss_temp_bytes_naive"]
  assert isinstance(summary["sample"]["continuation"], str)
  assert summary["figures"] == ["head_losses.png"]
  assert (workdir / "head_losses.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_log_every_head(mtp_smoke):
  workdir, summary = mtp_smoke
  records = support.read_jsonl(workdir / "metrics.jsonl")
  train = support.train_records(records)
  assert {f"loss_head{i}" for i in range(1, 5)} <= set(train[-1])
  val = support.val_records(records)[-1]
  assert val["val_loss_head1"] == summary["val_loss_per_head"][0]


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_polynomial_task_run_reports_exact_match(tmp_path):
  """The synthetic-task path: n=1 against n=2 on F7[X]/(X^5) arithmetic, answers decoded."""
  workdir = tmp_path / "poly"
  flags = ("--exp=mtp", "--preset=smoke", f"--workdir={workdir}", "--data.task=polynomial",
           "--train.seq_len=96", "--steps=4", "--compare_heads=1,2", "--spec_prompt_len=96",
           "--task_examples=4", "--task_ood_ops=6", "--model.mtp.heads=2")
  proc = support.launch(*flags)
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  support.assert_readme_summary_keys(summary, "mtp", absent_ok=("sample",))  # sample: corpus
  assert [r["heads"] for r in summary["runs"]] == [1, 2]
  for row in summary["runs"]:
    task = row["task"]
    assert task["task"] == "polynomial"
    for key in ("scored_token_accuracy", "exact_match_in_distribution", "exact_match_ood_6_ops"):
      assert 0.0 <= task[key] <= 1.0
    assert row["spec"]["identical_to_greedy"] is True
  # a rerun reads both finished runs from their rows and trains nothing
  again = support.launch(*flags)
  assert again.returncode == 0, support.describe(again)
  assert "variant n1: finished earlier" in again.stderr
  assert "variant n2: finished earlier" in again.stderr
  assert json.loads((workdir / "summary.json").read_text())["runs"] == summary["runs"]


def test_smoke_preset_runs_what_the_default_runs():
  smoke, default = mtp.get_config("smoke"), mtp.get_config("default")
  assert smoke.compare_heads == default.compare_heads == ()
  assert smoke.model.mtp == default.model.mtp

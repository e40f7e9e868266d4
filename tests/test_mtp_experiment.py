"""`python launch.py --exp=mtp --preset=smoke` end to end: the summary keys of the issue, the
per-head figure, and greedy self-speculative output identical to greedy decoding."""

import dataclasses
import json

import pytest

from experiments import mtp
from jaxtricks.errors import ConfigError
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
  for batch in ("batch", "batch1"):  # the chain and the (3, 2, 1) tree, both lossless
    methods = spec["methods"][batch]
    assert list(methods) == ["chain", "tree 3-2-1"]
    assert all(m["identical_to_greedy"] and m["pass_cost"] > 0 for m in methods.values())
    assert spec["best"][batch]["method"] in ("greedy", *methods)
  assert "tree_unavailable" not in spec
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
  assert smoke.compare_kinds == default.compare_kinds == ()
  assert smoke.model.mtp == default.model.mtp
  assert smoke.tree == default.tree


def test_heads_preset_matches_blocks_steps_and_tokens():
  """Every head family with n = 4 (next-token only with 1), each run 6 blocks: heads that are
  blocks take them from the trunk; linear and Medusa heads keep the whole trunk."""
  runs = mtp.variants(mtp.get_config("heads"))
  assert list(runs) == ["next_token", "transformer", "linear", "medusa", "sequential"]
  depth = {name: cfg.model.depth for name, cfg in runs.items()}
  assert depth == {"next_token": 6, "transformer": 3, "linear": 6, "medusa": 6, "sequential": 3}
  for name, cfg in runs.items():
    m = cfg.model.mtp
    assert (m.kind, m.heads) == (("transformer", 1) if name == "next_token" else (name, 4))
    assert cfg.model.depth + (m.heads - 1) * m.blocks == 6
    assert cfg.train == runs["next_token"].train


@pytest.mark.parametrize("fields,match", [
    (dict(compare_kinds=("nope",)), "unknown mtp kind 'nope'; valid: next_token, linear"),
    (dict(compare_kinds=("linear",), compare_heads=(1, 4)), "compare_heads or compare_kinds"),
    (dict(compare_heads=(0, 4), compare_kinds=()), "every entry must be >= 1"),
])
def test_bad_comparisons_are_refused(fields, match):
  config = dataclasses.replace(mtp.get_config("heads"), **fields)
  with pytest.raises(ConfigError, match=match):
    mtp.variants(config)


def _method(tpf, speedup, cost, identical=True):
  return {"tokens_per_forward": tpf, "speedup_vs_greedy": speedup, "pass_cost": cost,
          "identical_to_greedy": identical}


def test_best_decoding_is_the_fastest_lossless_one_and_says_why_others_are_slower():
  best = mtp.best_decoding({"methods": {"chain": _method(2.0, 0.8, 2.5),
                                        "tree 3-2-1": _method(2.4, 1.3, 1.85),
                                        "broken": _method(4.0, 3.0, 1.3, identical=False)}})
  assert best["method"] == "tree 3-2-1" and best["speedup_vs_greedy"] == 1.3
  assert best["notes"] == [
      "chain is slower than greedy (0.80x): a pass costs 2.50 greedy tokens and yields 2.00",
      "broken is not lossless (its output differs from greedy's): not counted"]
  none = mtp.best_decoding({"methods": {"chain": _method(2.0, 0.5, 4.0)}})
  assert none["method"] == "greedy" and none["speedup_vs_greedy"] == 1.0
  assert none["notes"][0].startswith("chain is slower than greedy (0.50x)")


@pytest.mark.slow  # the slow tier: five small runs end to end
def test_heads_preset_end_to_end(tmp_path):
  """`--preset=heads`, shrunk: a row per head family, every decoding lossless, a tree where the
  heads draft in parallel (not for sequential modules, which chain), the table printed."""
  workdir = tmp_path / "heads"
  proc = support.launch(
      "--exp=mtp", "--preset=heads", f"--workdir={workdir}", "--steps=3", "--log_every=1",
      "--model.d_model=32", "--model.n_layers=4", "--train.seq_len=32", "--train.batch_size=4",
      "--train.eval_batches=1", "--spec_prompts=2", "--spec_prompt_len=16",
      "--spec_new_tokens=8", "--sample_new_tokens=8")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  runs = {r["variant"]: r for r in summary["runs"]}
  assert list(runs) == ["next_token", "transformer", "linear", "medusa", "sequential"]
  assert {r["blocks"] for r in runs.values()} == {4}
  for name, r in runs.items():
    spec = r["spec"]
    assert spec["identical_to_greedy"] is True, name
    has_tree = name in ("transformer", "linear", "medusa")
    assert ("tree 3-2-1" in spec["methods"]["batch1"]) == has_tree, name
    assert ("tree_unavailable" in spec) != has_tree, name
  assert "model.mtp='sequential' heads do not" in runs["sequential"]["spec"]["tree_unavailable"]
  assert "variant" in proc.stderr and "tok/fwd chain tree" in proc.stderr

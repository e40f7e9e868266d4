"""`python launch.py --exp=finetune`: the smoke preset end to end (every method on both tasks,
slow tier), a one-method run in the default tier (its rerun reads the row back and the
pretrained run is untouched by fine-tuning), the sparse variant, and the refusals."""

import json

import pytest

from tests import support


def _run(workdir, *flags):
  proc = support.launch("--exp=finetune", "--preset=smoke", f"--workdir={workdir}", *flags)
  assert proc.returncode == 0, support.describe(proc)
  return json.loads((workdir / "summary.json").read_text())


@pytest.fixture(scope="module")
def one_method(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finetune") / "run"
  summary = _run(workdir, "--methods=lora", "--tasks=memorise")
  pretrain = support.file_digests(workdir / "pretrain" / "checkpoints")
  rerun = support.launch("--exp=finetune", "--preset=smoke", f"--workdir={workdir}",
                         "--methods=lora", "--tasks=memorise")
  return workdir, summary, pretrain, rerun


def test_a_lora_run_trains_adapters_only_and_merges(one_method):
  _, summary, _, _ = one_method
  (row,) = summary["rows"]
  assert (row["task"], row["method"]) == ("memorise", "lora")
  assert 0 < row["trainable_params"] < row["params"] / 10
  assert row["train_state_bytes"] == 12 * row["trainable_params"] + 8  # params, mu, nu; counts
  assert row["frozen_bytes"] == 4 * (row["params"] - row["trainable_params"])
  assert row["merged_equal"] and row["merged_density"] == 1.0
  steps = [s for s, _ in row["exact_match_curve"]]
  assert steps == [2, 4] and all(0 <= v <= 1 for _, v in row["exact_match_curve"])


def test_the_rerun_reads_the_row_and_leaves_the_pretrained_run(one_method):
  workdir, summary, pretrain, rerun = one_method
  assert rerun.returncode == 0, support.describe(rerun)
  assert "finished earlier, row read from" in rerun.stderr
  assert support.file_digests(workdir / "pretrain" / "checkpoints") == pretrain
  assert json.loads((workdir / "summary.json").read_text())["rows"] == summary["rows"]


@pytest.mark.parametrize("flags, message", [
    (["--methods=spp"], "method spp needs an N:M sparse pretrained model"),
    (["--methods=qlora"], "methods=('qlora',): unknown ['qlora']"),
    (["--spafit_groups=1,1"], "model.projection.groups=(1, 1) must be three block counts"),
    (["--rank=0"], "model.projection.rank=0 must be in 1..32"),
])
def test_bad_fine_tuning_configs_are_refused_before_training(tmp_path, flags, message):
  proc = support.launch("--exp=finetune", "--preset=smoke", f"--workdir={tmp_path / 'run'}",
                        *flags)
  assert proc.returncode == 2, support.describe(proc)
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last and "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "pretrain").exists()


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_smoke_preset_end_to_end(tmp_path):
  summary = _run(tmp_path / "run")
  support.assert_readme_summary_keys(summary, "finetune")
  rows = {(r["task"], r["method"]): r for r in summary["rows"]}
  methods = ("full", "lora", "mora", "spafit", "full+neftune")
  assert list(rows) == [(t, m) for t in ("domain", "memorise") for m in methods]
  assert all(r["merged_equal"] for r in rows.values())
  full, lora = rows["domain", "full"], rows["domain", "lora"]
  assert full["trainable_params"] == full["params"] and full["frozen_bytes"] == 0
  assert lora["train_state_bytes"] < 0.2 * full["train_state_bytes"]
  assert rows["domain", "spafit"]["trainable_params"] < lora["trainable_params"]
  mora = rows["domain", "mora"]["trainable_params"]
  assert 0.8 * lora["trainable_params"] <= mora <= lora["trainable_params"]
  assert all("forgetting" in rows["domain", m] for m in methods)
  assert all(len(rows["memorise", m]["exact_match_curve"]) == 2 for m in methods)
  assert (tmp_path / "run" / "memorisation.png").stat().st_size > 0


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_sparse_pretraining_keeps_spp_sparse(tmp_path):
  summary = _run(tmp_path / "run", "--model.projection=slope", "--methods=full,lora,spp",
                 "--tasks=domain")
  rows = {r["method"]: r for r in summary["rows"]}
  assert rows["spp"]["merged_density"] == 0.5 and rows["full"]["merged_density"] == 0.5
  assert rows["lora"]["merged_density"] > 0.9
  assert all(r["merged_equal"] for r in rows.values())

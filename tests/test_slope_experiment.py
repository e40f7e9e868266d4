"""`python launch.py --exp=slope --preset=smoke` end to end: all five default variants in the
default order, with a failure injected into the fourth and the rerun that finishes the rest.

Each variant trains once: dense, slope and slope_adapters in this process (srste then fails),
srste and dense_half in the rerun, which reads the first three rows from the workdir.
"""

import json

import pytest

from experiments import slope
from experiments.variants import VariantFailed
from jaxtricks.ops.sparsity import expected_extra_zeros
from tests import support


@pytest.fixture(scope="module")
def interrupted_then_rerun(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("slope") / "run"
  trained, real_train = [], slope.train

  def train_or_fail(cfg, directory, exp):
    trained.append(exp)
    if exp == "slope/srste":
      raise RuntimeError("injected failure")
    return real_train(cfg, directory, exp)

  config = slope.get_config("smoke").validate()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(slope, "train", train_or_fail)
    with pytest.raises(VariantFailed) as failure:
      slope.run(config, str(workdir))
  rows_after_failure = sorted(p.parent.name for p in (workdir / "variants").glob("*/row.json"))
  summary_after_failure = (workdir / "summary.json").exists()
  error_log = (workdir / "variants" / "srste" / "error.txt").read_text()
  proc = support.launch("--exp=slope", "--preset=smoke", f"--workdir={workdir}")
  return dict(workdir=workdir, trained=trained, message=str(failure.value),
              rows_after_failure=rows_after_failure, summary_after_failure=summary_after_failure,
              error_log=error_log, proc=proc)


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_failed_variant_is_one_line_and_keeps_earlier_rows(interrupted_then_rerun):
  run = interrupted_then_rerun
  assert run["trained"] == ["slope/dense", "slope/slope", "slope/slope_adapters", "slope/srste"]
  message = run["message"]
  assert "\n" not in message
  assert message.startswith("variant 'srste' failed: RuntimeError: injected failure")
  assert "dense, slope, slope_adapters" in message and "rerun the same command" in message
  assert run["rows_after_failure"] == ["dense", "slope", "slope_adapters"]
  assert not run["summary_after_failure"]
  assert "Traceback" in run["error_log"] and "injected failure" in run["error_log"]


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_rerun_trains_only_the_missing_variants(interrupted_then_rerun):
  run = interrupted_then_rerun
  proc = run["proc"]
  assert proc.returncode == 0, support.describe(proc)
  for name in ("dense", "slope", "slope_adapters"):
    assert f"variant {name}: finished earlier" in proc.stderr
  for name in ("srste", "dense_half"):
    assert f"variant {name}: finished earlier" not in proc.stderr
    assert f"slope/{name}:" in proc.stderr  # the training log of the variant
  assert not (run["workdir"] / "variants" / "srste" / "error.txt").exists()


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_smoke_summary_of_the_default_variants(interrupted_then_rerun):
  workdir = interrupted_then_rerun["workdir"]
  summary = json.loads((workdir / "summary.json").read_text())
  support.assert_readme_summary_keys(summary, "slope")
  rows = {r["name"]: r for r in summary["variants"]}
  assert tuple(rows) == slope.VARIANTS
  for r in rows.values():
    assert 0 < r["val_loss"] < 6 and r["wall_s"] > 0
    assert "memory" not in r and "checks" not in r
  assert rows["dense"]["nonzero_params"] == rows["dense"]["params"]
  assert rows["slope"]["params"] == rows["dense"]["params"]
  assert rows["slope"]["nonzero_params"] == rows["srste"]["nonzero_params"] < rows["dense"][
      "params"]
  assert rows["slope_adapters"]["params"] > rows["slope"]["params"]
  assert rows["dense_half"]["params"] < rows["dense"]["params"] / 2
  assert summary["static_masks_held"] is True
  assert summary["compressed_checkpoint"]["round_trip_exact"] is True
  assert (workdir / "slope_compressed").is_dir()
  assert 0.05 < summary["extra_zero_fraction"] < 0.14
  assert summary["extra_zero_fraction_at_init"]["2:4"] == pytest.approx(
      expected_extra_zeros(2, 4), abs=0.01)
  memory = summary["memory"]
  assert memory["compressed_weight_ratio"] == pytest.approx(0.5 + 1 / 32)
  assert memory["compressed_weight_bytes"] / memory["dense_weight_bytes"] == pytest.approx(
      0.5 + 1 / 32)
  # the pruned kernels' state in the dense run (dense_half, last, has none: the old crash)
  assert memory["pruned_layers_dense_state_bytes"] == 3 * memory["dense_weight_bytes"]
  assert 0.5 < memory["pruned_layers_state_ratio"] <= 0.70
  assert 0.5 < memory["train_state_ratio"] < 1
  assert sorted(summary["ordering"]) == sorted(rows)


def test_smoke_runs_the_default_variants():
  assert slope.get_config("smoke").variants == slope.get_config("default").variants == ()


def test_unknown_slope_variant_is_one_clear_line(tmp_path):
  proc = support.launch("--exp=slope", "--preset=smoke", "--variants=dense,sparse",
                        f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown variants ['sparse']")

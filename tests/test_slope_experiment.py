"""`python launch.py --exp=slope --preset=smoke` end to end (three of its five variants, to keep
the suite fast: the adapters and dense_half variants are the same code paths with other
configs, trained in tests/models/test_sparse_model.py)."""

import json

import pytest

from jaxtricks.ops.sparsity import expected_extra_zeros
from tests import support


def test_slope_smoke_summary(tmp_path):
  workdir = tmp_path / "slope"
  proc = support.launch("--exp=slope", "--preset=smoke", "--steps=4",
                        "--variants=dense,slope,srste", f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  rows = {r["name"]: r for r in summary["variants"]}
  assert list(rows) == ["dense", "slope", "srste"]
  for r in rows.values():
    assert set(r) >= {"name", "val_loss", "params", "nonzero_params"}
    assert 0 < r["val_loss"] < 6
  assert rows["dense"]["nonzero_params"] == rows["dense"]["params"]
  assert rows["slope"]["params"] == rows["dense"]["params"]
  assert rows["slope"]["nonzero_params"] == rows["srste"]["nonzero_params"] < rows["dense"][
      "params"]
  assert summary["static_masks_held"] is True
  assert summary["compressed_checkpoint"]["round_trip_exact"] is True
  assert (workdir / "slope_compressed").is_dir()
  assert 0.05 < summary["extra_zero_fraction"] < 0.14
  assert summary["extra_zero_fraction_at_init"]["2:4"] == pytest.approx(
      expected_extra_zeros(2, 4), abs=0.01)
  memory = summary["memory"]
  for key in ("dense_weight_bytes", "compressed_weight_bytes", "dense_train_state_bytes",
              "sparse_train_state_bytes"):
    assert memory[key] > 0, key
  assert memory["compressed_weight_bytes"] / memory["dense_weight_bytes"] == pytest.approx(
      0.5 + 1 / 32)
  assert memory["pruned_layers_state_ratio"] <= 0.70
  assert sorted(summary["ordering"]) == sorted(rows)


def test_unknown_slope_variant_is_one_clear_line(tmp_path):
  proc = support.launch("--exp=slope", "--preset=smoke", "--variants=dense,sparse",
                        f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown variants ['sparse']")

"""`python launch.py --exp=kan --preset=smoke` end to end (in a subprocess: the experiment turns
on float64, which must not leak into other tests)."""

import json

from tests import support


def test_kan_smoke_grid_extension(tmp_path):
  workdir = tmp_path / "kan"
  proc = support.launch("--exp=kan", "--preset=smoke", f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  rmse = {int(g): r for g, r in summary["rmse_by_grid"].items()}
  assert sorted(rmse) == [3, 5]
  assert all(0 < r < 0.5 for r in rmse.values())
  assert rmse[5] < rmse[3]  # a finer grid fits better
  assert summary["refine_rmse_change"]["5"] < 0.05  # extension kept the function (values 1..7)
  assert summary["figures"] == ["kan_grid_extension.png"]
  # hellokan: trained, pruned (never below one hidden node), formula and its error reported
  assert summary["pruned_widths"][0] == 2 and summary["pruned_widths"][-1] == 1
  assert 1 <= summary["pruned_widths"][1] <= 5
  assert isinstance(summary["symbolic_formula"], str) and summary["symbolic_rmse"] > 0
  assert (workdir / "kan_grid_extension.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_kan_config_is_one_clear_line(tmp_path):
  proc = support.launch("--exp=kan", "--preset=smoke", "--grids=5,3", f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: grids=(5, 3) must be increasing")

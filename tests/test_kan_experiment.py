"""`python launch.py --exp=kan --preset=smoke` end to end (in a subprocess: the experiment turns
on float64, which must not leak into other tests)."""

import json

import chex
import numpy as np
import pytest

from experiments import kan
from tests import support


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_kan_smoke_grid_extension(tmp_path):
  workdir = tmp_path / "kan"
  proc = support.launch("--exp=kan", "--preset=smoke", "--carry_opt_state=true",
                        f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  support.assert_readme_summary_keys(summary, "kan")
  rmse = {int(g): r for g, r in summary["rmse_by_grid"].items()}
  assert sorted(rmse) == [3, 5]
  assert all(0 < r < 0.5 for r in rmse.values())
  assert rmse[5] < rmse[3]  # a finer grid fits better
  assert summary["refine_rmse_change"]["5"] < 0.05  # extension kept the function (values 1..7)
  assert summary["figures"] == ["kan_grid_extension.png", "kan_pruned.png"]
  # hellokan: trained, pruned (never below one hidden node), formula and its error reported
  assert summary["pruned_widths"][0] == 2 and summary["pruned_widths"][-1] == 1
  assert 1 <= summary["pruned_widths"][1] <= 5
  assert isinstance(summary["symbolic_formula"], str) and summary["symbolic_rmse"] > 0
  for png in summary["figures"]:
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"


def test_bad_kan_config_is_one_clear_line(tmp_path):
  proc = support.launch("--exp=kan", "--preset=smoke", "--grids=5,3", f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: grids=(5, 3) must be increasing")


@pytest.mark.parametrize("preset", list(kan.SPECIAL))
def test_special_function_presets(preset):
  config = kan.get_config(preset).validate()
  target = kan.FUNCTIONS[config.function]
  u = np.random.default_rng(0).uniform(*target.domain, 50)
  chex.assert_tree_all_finite(target.fn(u, u[::-1]))
  assert not config.hellokan
  ones = np.ones_like(u)
  closed_forms = {  # (x, y, f(x, y)) on slices where f has an elementary form
      "sph_harm": [(u[::-1], u, np.sqrt(3 / (4 * np.pi)) * np.cos(u))],   # Y_1^0, polar y
      "lpmv": [(ones, u, u), (2 * ones, u, (3 * u ** 2 - 1) / 2)],         # P_1, P_2
      "jv": [(0.5 * ones, u + 0.1, np.sqrt(2 / (np.pi * (u + 0.1))) * np.sin(u + 0.1))],
      "ellipeinc": [(u, 0 * u, u), (u, ones, np.sin(u))],                  # m = 0 and m = 1
  }[preset]
  for x, y, expected in closed_forms:
    chex.assert_trees_all_close(target.fn(x, y), expected, rtol=1e-10, atol=1e-12)


def test_smoke_preset_runs_the_default_stages_smaller():
  """The same function, network, optimizer and hellokan pipeline; a shorter grid ladder."""
  smoke, default = kan.get_config("smoke"), kan.get_config("default")
  same = ("function", "widths", "optimizer", "hellokan", "hello_widths", "grid_spans_range")
  assert [getattr(smoke, k) for k in same] == [getattr(default, k) for k in same]
  assert smoke.grids == default.grids[:len(smoke.grids)]


def test_kan_config_refuses_flags_it_would_ignore(tmp_path):
  """The config holds only what the experiment uses: no model section, no train.log_every. An
  undefined flag is refused by the flag parser, a shortcut to a missing key by the override."""
  for flag, message in (("--model.d_model=3", "unknown flag --model.d_model;"),
                        ("--log_every=5", "unknown config key 'train.log_every'")):
    proc = support.launch("--exp=kan", "--preset=smoke", flag, f"--workdir={tmp_path}")
    assert proc.returncode == 2, support.describe(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), (
        support.describe(proc))
    assert "Traceback" not in proc.stderr

"""`python launch.py --exp=linearity --preset=smoke` end to end (the default's two models, scores,
replacement curves, figures), reading `--init_from`, and its bad settings refused in one line
before anything is trained."""

import json
import re

import pytest

from experiments import linearity
from jaxtricks.config import override
from jaxtricks.errors import UserError
from tests import support


def test_smoke_is_the_default_smaller():
  smoke, default = linearity.get_config("smoke"), linearity.get_config("default")
  assert smoke.ks == default.ks == () and smoke.reg_mode == default.reg_mode
  assert default.model == linearity.lm.get_config("default").model
  assert default.train.steps == linearity.lm.get_config("default").train.steps


@pytest.mark.parametrize("overrides,message", [
    ({"ks": (0, 2)}, "ks [2]: cannot replace that many of the model's 2 blocks"),
    ({"calib_batches": 0}, "calib_batches must be >= 1"),
    ({"calib_batches": 1, "train.batch_size": 1, "train.seq_len": 64},
     "calib_batches=1 gives 64 calibration tokens, not more than d_model + 1 = 65: the "
     "least-squares fit is underdetermined"),
    ({"reg_mode": "twist"}, "model.regulariser.mode='twist' is unknown"),
])
def test_bad_settings_are_refused_before_training(tmp_path, overrides, message):
  config = override(linearity.get_config("smoke"), overrides)
  with pytest.raises(UserError, match=re.escape(message)):
    linearity.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_bad_init_from_is_a_one_line_error(tmp_path):
  proc = support.launch("--exp=linearity", "--preset=smoke", f"--workdir={tmp_path / 'w'}",
                        "--init_from=/nonexistent/run")
  assert proc.returncode == 2, support.describe(proc)
  assert "/nonexistent/run" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "variants").exists()


@pytest.mark.slow  # the slow tier: two trainings and the analysis, then --init_from
def test_linearity_experiment_smoke_end_to_end(tmp_path):
  workdir = tmp_path / "lin"
  proc = support.launch("--exp=linearity", "--preset=smoke", f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  support.assert_readme_summary_keys(summary, "linearity")
  assert summary["figures"] == ["linearity.png", "replacement.png"]
  for name in ("base", "cosine"):
    row = summary[name]
    assert [s["layer"] for s in row["layers"]] == [0, 1]
    for s in row["layers"]:
      assert 0 <= s["without_residual"] <= s["with_residual"] <= 1, s
    assert [c["k"] for c in row["replacement"]] == [0, 1]
    assert row["replacement"][0]["replaced"] == []
    assert abs(row["replacement"][0]["loss"] - row["val_loss"]) < 1e-3  # k = 0 is the model
  # The analysis of a trained run read back with --init_from equals the run's own.
  base = workdir / "variants" / "base"
  again = tmp_path / "again"
  proc = support.launch("--exp=linearity", "--preset=smoke", f"--workdir={again}",
                        f"--init_from={base}")
  assert proc.returncode == 0, support.describe(proc)
  read = json.loads((again / "summary.json").read_text())
  assert read["base"]["init_from"] == str(base)
  for a, b in zip(read["base"]["layers"], summary["base"]["layers"], strict=True):
    assert abs(a["with_residual"] - b["with_residual"]) < 1e-4
  assert read["cosine"]["val_loss"] > 0  # trained with the recipe the workdir records

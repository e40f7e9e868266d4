"""`python launch.py --exp=slab --preset=smoke` end to end (the default's four models, decode state
bytes, decode speed folded and unfolded, norm costs) and its bad settings refused in one line."""

import json
import re

import pytest

from experiments import slab
from jaxtricks.config import override
from jaxtricks.errors import UserError
from tests import support


def test_smoke_runs_the_default_variants():
  smoke, default = slab.get_config("smoke"), slab.get_config("default")
  assert smoke.variants == default.variants == ()
  assert smoke.state_contexts == default.state_contexts == (1024, 8192, 32768)
  assert default.decode_context == 8192


@pytest.mark.parametrize("overrides,message", [
    ({"variants": ("softmax+rms", "linear+ln")}, "unknown variants ['linear+ln']"),
    ({"prepbn_steps": 0.9}, "prepbn_warm=0.25 and prepbn_steps=0.9 must be fractions"),
    ({"decode_context": 0}, "decode_context must be >= 1"),
])
def test_bad_settings_are_refused_before_training(tmp_path, overrides, message):
  config = override(slab.get_config("smoke"), overrides)
  with pytest.raises(UserError, match=re.escape(message)):
    slab.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_gamma_schedule_outside_0_1_is_a_one_line_error(tmp_path):
  proc = support.launch("--exp=slab", "--preset=smoke", f"--workdir={tmp_path / 'w'}",
                        "--model.norm=prepbn", "--model.norm.r0=2")
  assert proc.returncode == 2, support.describe(proc)
  assert "model.norm.r0=2.0: the gamma schedule must stay in [0, 1]" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "variants").exists()


@pytest.mark.slow  # the slow tier: four trainings and the decode timings
def test_slab_experiment_smoke_end_to_end(tmp_path):
  workdir = tmp_path / "slab"
  proc = support.launch("--exp=slab", "--preset=smoke", f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  support.assert_readme_summary_keys(summary, "slab")
  assert summary["figures"] == ["slab.png"]
  rows = {r["name"]: r for r in summary["variants"]}
  assert list(rows) == list(slab.VARIANTS)
  for name, row in rows.items():
    sizes = set(row["state_bytes"].values())
    assert (len(sizes) == 1) == name.startswith("linear"), (name, row["state_bytes"])
    if name.endswith("prepbn"):
      assert row["fold_max_logit_diff"] <= 1e-5
      assert row["decode_tokens_per_s_unfolded"] > 0
  assert set(summary["norm_cost_us"]) == {"rms", "prepbn", "folded"}

"""`python launch.py --exp=lckv --preset=smoke` end to end: the four layouts (the default's),
their cache figures from the allocated arrays, LCKV's exact sequential loss beside the iterative
one, the HyperAttention patching sweep, the figures; and its bad settings refused in one line."""

import json
import math

import pytest

from experiments import lckv
from tests import support


def test_smoke_runs_the_default_layouts():
  smoke, default = lckv.get_config("smoke"), lckv.get_config("default")
  assert smoke.variants == default.variants == ()
  assert smoke.model.n_layers % 2 == 0 and default.model.n_layers == 8


@pytest.mark.parametrize("flag,message", [
    ("--patch_layers=0,9", "patch_layers [9] must be in [0, 4]"),
    ("--hyper_block=5", "hyper_block=5 does not divide the patching context 32"),
    ("--variants=MQA,GQA", "unknown variants ['GQA']"),
    ("--window=-1", "window must be >= 1"),
])
def test_bad_settings_are_one_line_errors(tmp_path, flag, message):
  proc = support.launch("--exp=lckv", "--preset=smoke", f"--workdir={tmp_path / 'w'}", flag)
  assert proc.returncode != 0
  assert message in proc.stderr and "Traceback" not in proc.stderr, support.describe(proc)
  assert not (tmp_path / "w" / "variants").exists()


@pytest.mark.slow  # the slow tier: a long end-to-end run
def test_lckv_experiment_smoke_end_to_end(tmp_path):
  workdir = tmp_path / "lckv"
  proc = support.launch("--exp=lckv", "--preset=smoke", f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((workdir / "summary.json").read_text())
  support.assert_readme_summary_keys(summary, "lckv")
  assert summary["figures"] == ["lckv.png", "lckv_patching.png"]
  for name in summary["figures"]:
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  rows = {r["name"]: r for r in summary["variants"]}
  assert list(rows) == list(lckv.VARIANTS)
  mqa = rows["MQA"]
  assert mqa["kv_source"] == [0, 1, 2, 3]
  assert rows["LCKV"]["kv_source"] == [0, 2, 2, 3]  # warm-up layers 0 and 3, layer 1 reads 2
  assert rows["YOCO-like"]["kv_source"] == [0, 1, 2, 2]
  assert rows["YOCO-like"]["window_layers"] == [0, 1]
  context = summary["context_len"]
  for name, producers in (("MQA", 4), ("MQA-CLA2", 2), ("LCKV", 3)):
    assert rows[name]["cache_bytes_per_sequence"] == rows[name]["kv_bytes_per_token"] * context
    assert rows[name]["kv_bytes_per_token"] * 4 == mqa["kv_bytes_per_token"] * producers
  yoco = rows["YOCO-like"]
  assert yoco["kv_bytes_per_token"] * 4 == mqa["kv_bytes_per_token"]  # one global producer
  assert yoco["cache_bytes_per_sequence"] < mqa["cache_bytes_per_sequence"] / 2
  for row in rows.values():
    assert math.isfinite(row["val_loss"]) and row["decode_tokens_per_s"] > 0
  assert abs(rows["LCKV"]["exact_gap"]) < 0.05
  assert "exact_gap" not in mqa
  assert [p["layers"] for p in summary["patching"]] == [0, 2, 4]
  assert summary["patching"][0]["val_loss"] == pytest.approx(mqa["val_loss"], abs=1e-4)

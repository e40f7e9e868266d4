"""launch.py end to end (subprocesses): the smoke run's files, resuming by rerunning the same
command, and one-line errors without a traceback for every kind of user mistake."""

import concurrent.futures
import json
import math
import os
import shutil

import numpy as np
import pytest

from tests import support

SUMMARY_KEYS = ("exp", "steps", "params", "final_train_loss", "val_loss", "val_bits_per_byte",
                "tokens_per_s", "wall_s")


def smoke_param_count(v=256, d=64, layers=2, f=192):
  """Embedding, per layer (2 norms, q/k/v/o, SwiGLU gate/up/down), final norm, unembedding."""
  return v * d + layers * (2 * d + 4 * d * d + 3 * d * f) + d + d * v


def test_smoke_run_writes_config_metrics_summary_and_checkpoints(smoke_run):
  workdir = smoke_run.workdir
  config = smoke_run.config
  assert config["exp"] == "lm"
  assert config["model"]["d_model"] == 64 and config["model"]["n_layers"] == 2
  assert config["train"]["steps"] == 6 and config["train"]["log_every"] == 1
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [3, 6]
  assert (workdir / "loss.png").stat().st_size > 0


def test_smoke_summary(smoke_run):
  summary = smoke_run.summary
  for key in SUMMARY_KEYS:
    assert key in summary, key
  support.assert_readme_summary_keys(summary, "lm")
  assert summary["exp"] == "lm" and summary["steps"] == 6
  assert summary["params"] == smoke_param_count() == 139_584
  train, val = support.train_records(smoke_run.metrics), support.val_records(smoke_run.metrics)
  assert summary["final_train_loss"] == train[-1]["loss"]
  assert summary["val_loss"] == val[-1]["val_loss"]
  assert summary["val_bits_per_byte"] == pytest.approx(summary["val_loss"] / math.log(2))
  assert summary["tokens_per_s"] > 0 and summary["wall_s"] > 0
  assert 0 < summary["val_loss"] < math.log(256)  # learned something about bytes
  # launch.py prints the scalar part of the summary as JSON on stdout.
  printed = json.loads(smoke_run.proc.stdout)
  assert printed == {k: v for k, v in summary.items() if not isinstance(v, dict | list)}


def test_smoke_metrics(smoke_run):
  records = smoke_run.metrics
  assert support.duplicated_steps(records) == []
  train = support.train_records(records)
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in support.val_records(records)] == [6]
  for r in train:
    assert all(np.isfinite(r[k]) for k in ("loss", "grad_norm", "lr", "accuracy"))
  assert train[-1]["loss"] < train[0]["loss"] - 1.0
  assert train[0]["lr"] == 0.0 and train[-1]["lr"] > 0  # warm-up from zero


@pytest.fixture(scope="module")
def rerun(smoke_run, tmp_path_factory):
  """The smoke command run again in (a copy of) its finished workdir."""
  workdir = tmp_path_factory.mktemp("rerun") / "run"
  shutil.copytree(smoke_run.workdir, workdir)
  flags = [f for f in smoke_run.flags if not f.startswith("--workdir=")]
  proc = support.launch(*flags, f"--workdir={workdir}")
  return workdir, proc


def _finished_rerun(rerun):
  workdir, proc = rerun
  assert proc.returncode == 0, support.describe(proc)
  return workdir, proc


def test_rerun_resumes_and_gives_the_same_summary(rerun, smoke_run):
  workdir, proc = _finished_rerun(rerun)
  assert "resumed from" in proc.stderr
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["val_loss"] == smoke_run.summary["val_loss"]
  assert summary["final_train_loss"] == smoke_run.summary["final_train_loss"]
  assert summary["steps"] == 6 and summary["params"] == smoke_run.summary["params"]
  # Nothing was trained again: the training log is the first run's.
  records = support.read_jsonl(workdir / "metrics.jsonl")
  assert support.train_records(records) == support.train_records(smoke_run.metrics)


def test_rerun_does_not_duplicate_metrics(rerun):
  workdir, _ = _finished_rerun(rerun)
  records = support.read_jsonl(workdir / "metrics.jsonl")
  assert support.duplicated_steps(records) == []


# The bad-input table: name -> (flags, devices, substrings the one error line must contain).
# Every case runs in a copy of the finished smoke workdir, which must come out unchanged. Flags may
# name {tmp}, a fresh folder of the case. Unknown config keys given as overrides from Python:
# tests/test_config.py; a non-finite loss: tests/train/test_loop.py and tests/test_faults.py.
ERRORS = {
    "unknown_exp": (["--exp=nope"], 1,
                    ["unknown experiment 'nope'", "valid: lm, cla, mtp, kan"]),
    "unknown_preset": (["--exp=lm", "--preset=huge"], 1,
                       ["no preset 'huge'", "valid: smoke, default, full"]),
    "unknown_key": (["--preset=smoke", "--model.d_modle=32"], 1,
                    ["unknown flag --model.d_modle", "did you mean --model.d_model"]),
    "unknown_flag": (["--preset=smoke", "--stepz=3"], 1,
                     ["unknown flag --stepz", "did you mean --steps"]),
    "bad_type": (["--preset=smoke", "--model.d_model=abc"], 1,
                 ["model.d_model: cannot parse 'abc' as int"]),
    "heads_do_not_divide": (["--preset=smoke", "--model.attention.n_heads=3"], 1,
                            ["model.attention.n_heads=3 does not divide model.d_model=64"]),
    "cla_factor_above_depth": (["--preset=smoke", "--model.attention.kv_sharing=3"], 1,
                               ["CLA sharing factor 3 must be between 1 and the depth 2"]),
    "sparse_n_above_m": (["--preset=smoke", "--model.projection=slope", "--model.projection.n=5",
                          "--model.projection.m=4"], 1, ["N:M sparsity needs 0 < N <= M", "N=5"]),
    "kan_grid_below_1": (["--preset=smoke", "--model.mlp=kan", "--model.mlp.grid=0"], 1,
                         ["model.mlp.grid=0 must be >= 1"]),
    "field_of_another_kind": (["--preset=smoke", "--model.mlp.grid=3"], 1,
                              ["model.mlp.grid is a field of model.mlp=kan, not of the chosen "
                               "model.mlp='swiglu'"]),
    "unknown_kind": (["--preset=smoke", "--model.projection=qlora"], 1,
                     ["model.projection='qlora' is unknown; valid: bitfit, dense, lora, mora, "
                      "slope, spafit, spp, srste"]),
    "old_config_format": (["--preset=smoke"], 1,
                          ["was written by an older jaxtricks (a flat model config"]),
    "batch_not_divisible": (["--preset=smoke", "--train.batch_size=12"], 8,
                            ["train.batch_size=12 is not divisible by the data-parallel size 8"]),
    "empty_corpus": (["--preset=smoke", "--data.corpus=/nonexistent/*.txt"], 1,
                     ["corpus '/nonexistent/*.txt' matched no files"]),
    "empty_corpus_files": (["--preset=smoke", "--data.corpus={tmp}/*.txt"], 1,
                           ["holds no text: all files are empty"]),
    "resume_other_model": (["--preset=smoke", "--model.d_model=32"], 1,
                           ["holds checkpoints of a different model", "model.d_model: 64 -> 32",
                            "use another --workdir"]),
    "checkpoint_of_other_shapes": (["--preset=smoke", "--model.d_model=32"], 1,
                                   ["holds parameters of other shapes than this model",
                                    "(64, 2, 32) in the checkpoint, (32, 2, 16) here",
                                    "not a topology change"]),
    "tensor_does_not_divide_vocab": (["--preset=smoke", "--mesh.fsdp=1", "--mesh.tensor=3"], 3,
                                     ["mesh.tensor=3 does not divide the vocabulary",
                                      "--model.vocab_size=258"]),
    "workdir_read_only": (["--preset=smoke"], 1, ["is not writable: Permission denied"]),
    "workdir_full": (["--preset=smoke"], 1, ["is not writable: File too large"]),
}
SKIPS = {  # name -> reason, where the case cannot run here
    "workdir_read_only": ("root ignores file permissions" if os.geteuid() == 0 else None),
}
# The flat model config of jaxtricks before components, as its config.json held it.
OLD_MODEL = {"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 0,
             "attention": "mha", "mlp": "swiglu", "mtp_heads": 1, "sparsity": "none"}
CASES = [pytest.param(name, marks=pytest.mark.skipif(bool(SKIPS.get(name)),
                                                     reason=SKIPS.get(name) or ""))
         for name in ERRORS]


@pytest.fixture(scope="module")
def error_runs(smoke_run, tmp_path_factory):
  """Every case of ERRORS that can run here, two at a time (short, mostly single-threaded)."""
  base = tmp_path_factory.mktemp("errors")

  def run(name):
    flags, devices, _ = ERRORS[name]
    workdir, tmp = base / name / "run", base / name / "tmp"
    shutil.copytree(smoke_run.workdir, workdir)
    tmp.mkdir()
    for i in range(3):
      (tmp / f"empty{i}.txt").write_bytes(b"")
    flags = [f.format(tmp=tmp) for f in flags] + [f"--workdir={workdir}"]
    if name == "old_config_format":  # the smoke run's checkpoints under the old format
      config = json.loads((workdir / "config.json").read_text())
      (workdir / "config.json").write_text(json.dumps(dict(config, model=OLD_MODEL)))
    if name == "checkpoint_of_other_shapes":  # no config.json to compare: the shapes decide
      (workdir / "config.json").unlink()
    before = support.file_digests(workdir)
    if name == "workdir_full":  # no file can grow: as on a full disk
      return support.launch_limited(*flags, file_size_limit=0, devices=devices), before
    if name == "workdir_read_only":
      for path in (workdir, *workdir.rglob("*")):
        path.chmod(path.stat().st_mode & ~0o222)
      try:
        return support.launch(*flags, devices=devices), before
      finally:
        for path in (workdir, *workdir.rglob("*")):
          path.chmod(path.stat().st_mode | 0o200)
    return support.launch(*flags, devices=devices), before

  names = [name for name in ERRORS if not SKIPS.get(name)]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    procs = dict(zip(names, pool.map(run, names), strict=True))
  return procs, base


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_clear_line_without_traceback(error_runs, name):
  procs, _ = error_runs
  proc, _ = procs[name]
  assert proc.returncode == 2, support.describe(proc)
  assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, support.describe(proc)
  assert proc.stderr.rstrip().splitlines()[-1] == error_lines[0]
  for text in ERRORS[name][2]:
    assert text in error_lines[0], support.describe(proc)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_leaves_the_workdir_and_its_checkpoints_untouched(error_runs, smoke_run, name):
  procs, base = error_runs
  assert support.file_digests(base / name / "run") == procs[name][1]


def test_refused_resume_leaves_the_workdir_untouched(error_runs, smoke_run):
  _, base = error_runs
  workdir = base / "resume_other_model" / "run"
  assert json.loads((workdir / "config.json").read_text()) == smoke_run.config
  assert support.read_jsonl(workdir / "metrics.jsonl") == smoke_run.metrics


@pytest.mark.slow
def test_lm_smoke_preset_as_documented(tmp_path):
  """The README's `--preset=smoke`, unshortened (30 steps): it runs and learns."""
  proc = support.launch("--exp=lm", "--preset=smoke", f"--workdir={tmp_path / 'lm'}")
  assert proc.returncode == 0, support.describe(proc)
  summary = json.loads((tmp_path / "lm" / "summary.json").read_text())
  assert summary["steps"] == 30 and summary["val_bits_per_byte"] < 6.0


def test_help_lists_every_component_kind_and_field():
  proc = support.launch("--exp=lm", "--preset=smoke", "--help")  # absl exits 1 after --help
  text = " ".join((proc.stdout + proc.stderr).split())  # absl wraps long help lines
  assert "Traceback" not in text, support.describe(proc)
  for line in ("--model.mlp: default: 'swiglu' (one of kan, swiglu)",
               "--model.mlp.grid: default: 5 (with model.mlp=kan)",
               "--model.projection.decay: default: 0.0002 (with model.projection=srste)",
               "--model.projection.n: default: 2 (with model.projection=slope/spp/srste)",
               "--model.embed: default: 'token' (one of neftune, token)",
               "--model.attention.n_heads: default: 2", "--train.lr: default: 0.003"):
    assert line in text, line

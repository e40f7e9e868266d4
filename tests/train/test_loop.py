"""The training loop: a resumed run equals the uninterrupted run bitwise; metrics are not
duplicated; a non-finite loss stops the run with a clear message and keeps the last checkpoint."""

import dataclasses
import json
import re
import shutil

import chex
import jax
import numpy as np
import pytest

from jaxtricks.config import Config, override, to_dict
from jaxtricks.data.corpus import DataConfig
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.train import loop
from jaxtricks.train.config import TrainConfig
from tests import support

STEPS = 4


@pytest.fixture(scope="module")
def corpus_glob(tmp_path_factory):
  return support.write_text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def config(corpus_glob):
  return Config(
      model=ModelConfig(d_model=32, n_layers=1, attention=AttentionConfig(n_heads=2)),
      train=TrainConfig(steps=STEPS, batch_size=4, seq_len=16, warmup_steps=1, log_every=1,
                        ckpt_every=STEPS // 2, eval_every=STEPS // 2, eval_batches=1),
      data=DataConfig(corpus=corpus_glob, val_fraction=0.2))


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory):
  """An uninterrupted run; then the same workdir with its final checkpoint deleted, resumed."""
  workdir = tmp_path_factory.mktemp("loop") / "run"
  full = loop.train(config, str(workdir))
  full_state = to_numpy(full.state)
  full_metrics = support.read_jsonl(workdir / "metrics.jsonl")
  ckpt_dir = workdir / "checkpoints"
  saved_steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  shutil.rmtree(ckpt_dir / str(STEPS))
  resumed = loop.train(config, str(workdir))
  return dict(full=full, full_state=full_state, full_metrics=full_metrics,
              saved_steps=saved_steps, resumed=resumed, workdir=workdir,
              resumed_metrics=support.read_jsonl(workdir / "metrics.jsonl"))


def test_checkpoints_are_written_every_ckpt_every_steps(runs):
  assert runs["saved_steps"] == [STEPS // 2, STEPS]


def test_resumed_run_equals_uninterrupted_run_bitwise(runs):
  full, resumed = runs["full_state"], to_numpy(runs["resumed"].state)
  assert int(resumed.step) == STEPS
  chex.assert_trees_all_equal(full, resumed, strict=True)  # structure, shapes, dtypes, values


def test_second_run_resumed_from_the_middle_checkpoint(runs):
  """Not a rerun from scratch (which would give the same numbers): the log lines up to the
  checkpoint are the first run's own lines, timings included."""
  full, resumed = runs["full_metrics"], runs["resumed_metrics"]
  kept = [r for r in full if r["step"] <= STEPS // 2]
  assert resumed[:len(kept)] == kept
  assert resumed[len(kept)]["elapsed_s"] != full[len(kept)]["elapsed_s"]


def test_resumed_metrics_continue_the_log_without_duplicates(runs):
  full, resumed = runs["full_metrics"], runs["resumed_metrics"]
  assert support.duplicated_steps(full) == []
  assert support.duplicated_steps(resumed) == []
  assert [r["step"] for r in support.train_records(resumed)] == list(range(1, STEPS + 1))
  assert [r["step"] for r in support.val_records(resumed)] == [STEPS // 2, STEPS]
  for a, b in zip(support.train_records(full), support.train_records(resumed), strict=True):
    assert {k: a[k] for k in ("step", "loss", "grad_norm", "lr", "accuracy")} == \
           {k: b[k] for k in ("step", "loss", "grad_norm", "lr", "accuracy")}
  assert support.val_records(full) == support.val_records(resumed)


def test_resumed_summary_equals_uninterrupted_summary(runs):
  full, resumed = runs["full"].summary, runs["resumed"].summary
  for key in ("steps", "params", "final_train_loss", "val_loss", "val_bits_per_byte",
              "val_accuracy"):
    assert full[key] == resumed[key], key
  assert full["val_bits_per_byte"] == pytest.approx(full["val_loss"] / np.log(2))
  losses = [r["loss"] for r in support.train_records(runs["full_metrics"])]
  assert full["final_train_loss"] == losses[-1]


def test_check_resumable(runs, config):
  workdir = str(runs["workdir"])
  changed = dataclasses.replace(config, model=dataclasses.replace(config.model, d_model=64))
  with pytest.raises(ConfigError) as err:
    loop.check_resumable(workdir, changed)
  assert "model.d_model: 32 -> 64" in str(err.value)
  loop.check_resumable(workdir, config)  # the config that wrote the workdir: no error


def test_non_finite_loss_stops_with_a_clear_message(config, tmp_path):
  exploding = dataclasses.replace(config, train=dataclasses.replace(
      config.train, lr=1e30, warmup_steps=0, grad_clip=0.0, ckpt_every=1, eval_every=0))
  with pytest.raises(loop.NonFiniteLoss) as err:
    loop.train(exploding, str(tmp_path / "run"))
  message = str(err.value)
  match = re.fullmatch(r"loss is (nan|inf) at step (\d+); training stopped and the last good "
                       r"checkpoint \(step (\d+)\) is kept in (.+)", message)
  assert match, message
  bad, good = int(match.group(2)), int(match.group(3))
  assert good == bad - 1 >= 1
  kept = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                if p.name.isdigit())
  assert kept[-1] == good
  metrics = support.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  chex.assert_tree_all_finite([r["loss"] for r in metrics])
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 1e30


def test_fields_added_since_a_checkpoint_are_fine_at_their_defaults(tmp_path, config):
  """A workdir written before a field existed (of the model or of one of its components) still
  resumes while that field keeps its default, and is refused once it does not."""
  saved = json.loads(json.dumps(to_dict(config)))
  del saved["model"]["attention"]["rope_base"]  # as if written before the field existed
  del saved["model"]["norm_eps"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loop.check_resumable(str(tmp_path), config)
  changed = override(config, {"model.attention.rope_base": "500"})
  with pytest.raises(ConfigError, match="model.attention.rope_base: 10000.0 -> 500.0"):
    loop.check_resumable(str(tmp_path), changed)
  kan = override(config, {"model.mlp": "kan"})
  with pytest.raises(ConfigError, match="model.mlp.kind: 'swiglu' -> 'kan'"):
    loop.check_resumable(str(tmp_path), kan)


def test_a_workdir_of_the_flat_config_format_is_refused(tmp_path, config):
  old = {"model": {"vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2,
                   "attention": "mha", "mtp_heads": 1, "sparsity": "none"}}
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(ConfigError, match=r"written by an older jaxtricks \(a flat model config"):
    loop.check_resumable(str(tmp_path), config)

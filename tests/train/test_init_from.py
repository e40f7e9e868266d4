"""`--init_from`: a pretrained run's parameters loaded into a fine-tuning model (equal to the
source's, adapters at their init, the source untouched), and every bad source refused in one
line."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxtricks import checkpoint
from jaxtricks.config import Config
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.lora import LoRAProjection
from jaxtricks.layers.neftune import NEFTuneEmbedConfig
from jaxtricks.layers.nm_projection import SlopeProjection
from jaxtricks.layers.spp import SPPProjection
from jaxtricks.models import merge
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.train import init_from
from jaxtricks.train.build import build
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.loop import train
from jaxtricks.train.state import FrozenBaseState
from tests import support

MODEL = ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=2))
TRAIN = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=0, log_every=1,
                    ckpt_every=0, eval_batches=1, async_checkpoints=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Two trained source runs: a dense one and a SLoPe 2:4 one."""
  root = tmp_path_factory.mktemp("sources")
  dense, slope = root / "dense", root / "slope"
  train(Config(model=MODEL, train=TRAIN), str(dense))
  train(Config(model=dataclasses.replace(MODEL, projection=SlopeProjection()), train=TRAIN),
        str(slope))
  return dense, slope


def _config(source, **model):
  return Config(model=dataclasses.replace(MODEL, **model),
                train=dataclasses.replace(TRAIN, init_from=str(source)))


def _load(config, workdir):
  built = build(config)
  return built.init_state(loaded=init_from.load(init_from.check(config, str(workdir)), built))


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def test_loaded_parameters_equal_the_source(sources, tmp_path):
  dense, _ = sources
  before = support.file_digests(dense)
  state = _load(_config(dense, projection=LoRAProjection(rank=2),
                        embed=NEFTuneEmbedConfig()), tmp_path / "ft")
  assert support.file_digests(dense) == before, "the source was written"
  assert isinstance(state, FrozenBaseState) and int(state.step) == 0
  saved = _flat(checkpoint.read_numpy(str(dense / "checkpoints"), 2)["params"])
  loaded = _flat(state.model_params())
  adapters = {p for p in loaded if p[-1] in ("lora_a", "lora_b")}
  assert set(loaded) - adapters == set(saved)
  for path, value in saved.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg="/".join(path))
  assert all(not np.any(loaded[p]) for p in adapters if p[-1] == "lora_b")
  assert set(_flat(state.params)) == adapters  # only the adapters train


def test_spp_keeps_the_slope_masks_and_refuses_a_dense_model(sources, tmp_path):
  dense, slope = sources
  state = _load(_config(slope, projection=SPPProjection(rank=2)), tmp_path / "spp")
  saved = _flat(checkpoint.read_numpy(str(slope / "checkpoints"), 2)["params"])
  loaded = _flat(state.model_params())
  for path, value in saved.items():
    np.testing.assert_array_equal(loaded[path], value)
  assert np.mean(loaded[("block_0", "attn", "q", "kernel")] != 0) == 0.5
  with pytest.raises(init_from.ConfigError, match="spp needs an N:M sparse pretrained model"):
    _load(_config(dense, projection=SPPProjection(rank=2)), tmp_path / "spp_dense")


def test_a_step_changes_only_the_adapters_and_spp_stays_sparse(sources, tmp_path):
  _, slope = sources
  config = _config(slope, projection=SPPProjection(rank=2))
  built = build(config)
  state = built.init_state(loaded=init_from.load(init_from.check(config, str(tmp_path)), built))
  before = _flat({"params": state.params, "frozen": state.frozen})
  rng = np.random.default_rng(0)
  window = rng.integers(0, 256, (TRAIN.batch_size, TRAIN.seq_len + 1)).astype(np.int32)
  new, _ = built.train_step(state, {"inputs": window[:, :-1], "targets": window[:, 1:]})
  after = _flat({"params": new.params, "frozen": new.frozen})
  changed = {p for p in before if p[0] in ("params", "frozen")
             and not np.array_equal(before[p], after[p])}
  assert changed and all(p[0] == "params" and p[-1] in ("spp_a", "spp_b") for p in changed)
  _, merged = merge.merged_params(config.model, jax.device_get(new.model_params()))
  for path, w in _flat(merged).items():
    if path[-1] == "kernel" and path[-2] in ("q", "k", "v", "up", "gate"):
      w_IxO = np.asarray(w).reshape(w.shape[0], -1)
      assert (w_IxO != 0).reshape(-1, 4, w_IxO.shape[1]).sum(axis=1).max() <= 2, path
      assert np.mean(w_IxO != 0) == 0.5, path


def test_a_slope_source_merges_into_a_lora_model(sources, tmp_path):
  _, slope = sources
  state = _load(_config(slope, projection=LoRAProjection(rank=2)), tmp_path / "lora")
  kernel = _flat(state.model_params())[("block_1", "mlp", "down", "kernel")]
  assert np.mean(kernel != 0) == 0.5  # SLoPe's masked kernel, no adapters in the source


def _write_config(directory, **content):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(content))
  return directory


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty", "is not a jaxtricks run"),
    ("kan", "is a KAN run"),
    ("variants", "holds the variants of --exp=slope, not one run; point it at one of them, "
                 "e.g. "),
    ("no_checkpoint", "has no finished checkpoint"),
    ("other_model", "holds another model (model.d_model: 32 there, 48 here)"),
    ("own_workdir", "is the run's own --workdir"),
])
def test_bad_sources(sources, tmp_path, case, message):
  dense, _ = sources
  model, workdir = {}, tmp_path / "ft"
  source = {
      "missing": lambda: tmp_path / "nowhere",
      "empty": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
      "kan": lambda: _write_config(tmp_path / "kan", exp="kan", width=[2, 1]),
      "variants": lambda: (_write_config(tmp_path / "sl", exp="slope", model={}) / "variants"
                           / "dense" / "checkpoints").mkdir(parents=True) or tmp_path / "sl",
      "no_checkpoint": lambda: _write_config(
          tmp_path / "new", exp="lm",
          model=json.loads((dense / "config.json").read_text())["model"]),
      "other_model": lambda: dense,
      "own_workdir": lambda: dense,
  }[case]()
  if case == "other_model":
    model = dict(d_model=48)
  if case == "own_workdir":
    workdir = dense
  with pytest.raises(init_from.InitFromError) as e:
    init_from.check(_config(source, **model), str(workdir))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_launch_refuses_a_bad_source_in_one_line(tmp_path):
  proc = support.launch("--exp=lm", "--preset=smoke", f"--workdir={tmp_path / 'ft'}",
                        f"--init_from={tmp_path / 'nowhere'}")
  assert proc.returncode == 2, support.describe(proc)
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --init_from=")
  assert "Traceback" not in proc.stderr

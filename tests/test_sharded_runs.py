"""Sharded runs (8 CPU devices, in one subprocess: tests/sharded_runs.py) equal the one-device
run, really shard the parameters, and resume across topologies. Slow tier: the subprocess trains
six models."""

import json

import numpy as np
import pytest

from experiments import get_config
from jaxtricks.config import override
from jaxtricks.train.loop import train
from tests import sharded_runs, support

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, smoke_run, fake_devices):
  workdir = tmp_path_factory.mktemp("sharded")
  proc = support.run_python(["tests/sharded_runs.py", str(workdir), str(smoke_run.workdir)],
                            devices=fake_devices)
  assert proc.returncode == 0, support.describe(proc)
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["device_count"] == fake_devices == 8  # the layouts below are written for 8
  return workdir, report


@pytest.mark.parametrize("name,mesh", [("fsdp8", {"data": 1, "fsdp": 8, "context": 1,
                                                  "tensor": 1}),
                                       ("data2_fsdp2_tensor2", {"data": 2, "fsdp": 2,
                                                                "context": 1, "tensor": 2})])
def test_sharded_run_equals_one_device_run(sharded, smoke_run, name, mesh):
  workdir, report = sharded
  assert report[name]["mesh"] == mesh
  reference = smoke_run.metrics
  records = support.read_jsonl(workdir / name / "metrics.jsonl")
  assert [r["step"] for r in records] == [r["step"] for r in reference]
  ref_train, got_train = support.train_records(reference), support.train_records(records)
  assert len(ref_train) == 6
  for key in ("loss", "grad_norm", "accuracy", "lr"):
    np.testing.assert_allclose([r[key] for r in got_train], [r[key] for r in ref_train],
                               rtol=1e-5, atol=1e-6, err_msg=f"{name}: {key}")
  np.testing.assert_allclose([r["val_loss"] for r in support.val_records(records)],
                             [r["val_loss"] for r in support.val_records(reference)], rtol=1e-5)
  assert report[name]["summary_val_loss"] == pytest.approx(smoke_run.summary["val_loss"],
                                                           rel=1e-5)


def test_sharded_multi_token_run_equals_one_device_run(sharded, mtp_smoke_run):
  workdir, _ = sharded
  reference = mtp_smoke_run.metrics
  records = support.read_jsonl(workdir / "mtp_fsdp8" / "metrics.jsonl")
  ref_train, got_train = support.train_records(reference), support.train_records(records)
  assert len(ref_train) == 6
  for key in ("loss", "loss_head1", "loss_head4", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in got_train], [r[key] for r in ref_train],
                               rtol=1e-5, atol=1e-6, err_msg=key)


def test_sharded_slope_run_equals_one_device_run(sharded, tmp_path):
  workdir, _ = sharded
  config = override(get_config("lm", "smoke"),  # in this process: one device
                    {**support.SMOKE_OVERRIDES, **sharded_runs.SLOPE_OVERRIDES})
  train(config, str(tmp_path / "slope"))
  reference = support.train_records(support.read_jsonl(tmp_path / "slope" / "metrics.jsonl"))
  got = support.train_records(support.read_jsonl(workdir / "slope_fsdp8" / "metrics.jsonl"))
  assert len(reference) == 6
  for key in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose([r[key] for r in got], [r[key] for r in reference],
                               rtol=1e-5, atol=1e-6, err_msg=key)


def test_fsdp_shards_every_matrix_over_all_devices(sharded):
  _, report = sharded
  params = report["fsdp8"]["params"]
  emb = params["['embed']['embedding']"]
  assert emb["shape"] == [256, 64] and emb["shard_shape"] == [256, 8]
  for path, p in params.items():
    assert p["n_devices"] == 8
    if len(p["shape"]) >= 2:  # the 'embed' axis (64) of every kernel is split 8 ways
      assert np.prod(p["shard_shape"]) * 8 == np.prod(p["shape"]), path
    else:  # norm scales are replicated
      assert p["shard_shape"] == p["shape"], path


def test_data_fsdp_tensor_mesh_shards_over_fsdp_and_tensor(sharded):
  _, report = sharded
  params = report["data2_fsdp2_tensor2"]["params"]
  expected = {
      "['embed']['embedding']": ([256, 64], [128, 32]),  # (vocab/tensor, embed/fsdp)
      "['block_0']['attn']['q']['kernel']": ([64, 2, 32], [32, 1, 32]),  # heads over tensor
      "['block_0']['mlp']['gate']['kernel']": ([64, 192], [32, 96]),
      "['block_0']['mlp']['down']['kernel']": ([192, 64], [96, 32]),
      "['head']['unembed']['kernel']": ([64, 256], [32, 128]),
      "['block_1']['attn_norm']['scale']": ([64], [64]),
  }
  for path, (shape, shard) in expected.items():
    assert (params[path]["shape"], params[path]["shard_shape"]) == (shape, shard), path


def test_adam_moments_are_sharded_like_the_parameters(sharded):
  _, report = sharded
  params, opt = report["fsdp8"]["params"], report["fsdp8"]["mu"]
  emb = [v for k, v in opt.items() if "mu" in k and "['embed']['embedding']" in k]
  assert emb and all(v["shard_shape"] == params["['embed']['embedding']"]["shard_shape"]
                     for v in emb)


def test_checkpoint_of_one_device_resumes_on_all_devices(sharded, smoke_run):
  workdir, report = sharded
  assert report["resume_1_to_all"]["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
  support.assert_resumed_like_uninterrupted(workdir / "resume_1_to_all", smoke_run.workdir)


def test_checkpoint_of_all_devices_resumes_on_one_device(sharded, smoke_run, tmp_path):
  workdir, _ = sharded
  resumed = tmp_path / "resume_all_to_1"
  sharded_runs.resume_elsewhere(workdir / "fsdp8", resumed, step=3)
  result = train(override(get_config("lm", "smoke"), support.SMOKE_OVERRIDES), str(resumed))
  assert result.summary["devices"] == 1
  support.assert_resumed_like_uninterrupted(resumed, smoke_run.workdir)

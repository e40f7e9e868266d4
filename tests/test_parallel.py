"""The per-device (jax.shard_map) code on fake CPU devices: the vocabulary-parallel loss and ring
attention equal their unsharded references (forward and gradients, 1e-5), and one train step of
the LM and the multi-token model on meshes that split the vocabulary and the sequence equals the
one-device step, as do the steps of the LCKV, YOCO-like, PRepBN and linear-attention kinds (slow
tier). Computed in subprocesses (tests/parallel_checks.py) with the session's fake device count;
mesh-fit errors in this process."""

import json

import pytest

from experiments import get_config
from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.ops.vocab_parallel import ROW_CHUNK, row_chunk
from jaxtricks.sharding import MeshConfig
from jaxtricks.train.build import check_mesh_fits_model
from tests import support

TOL = 1e-5


@pytest.fixture(scope="module")
def report(fake_devices):
  proc = support.run_python(["tests/parallel_checks.py"], devices=fake_devices)
  assert proc.returncode == 0, support.describe(proc)
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["device_count"] == fake_devices
  return report


def test_vocab_parallel_loss_equals_the_unsharded_loss(report):
  cases = report["vocab_parallel"]
  assert 0.2 < cases.pop("accuracy") < 0.9  # half the targets are the argmax: a real check
  assert cases.pop("reference_full_logits_in_hlo")
  # mesh data x fsdp x context x tensor: tensor = 2 and 4
  assert {"1x1x1x2", "1x1x1x4"} <= set(cases)
  for mesh, diffs in cases.items():
    assert diffs["loss"] <= TOL and diffs["grad"] <= TOL and diffs["accuracy"] == 0, mesh
    assert not diffs["full_logits_in_hlo"], f"{mesh}: a device holds the whole (B, T, V) logits"


def test_ring_attention_equals_unsharded_attention(report):
  cases = report["ring"]
  assert {"1x1x2x1", "1x1x4x1", "1x1x8x1"} <= set(cases)
  for mesh, diffs in cases.items():
    assert diffs["out"] <= TOL and diffs["grad"] <= TOL, (mesh, diffs)


def check_step_case(case: dict, mesh: dict) -> None:
  assert case["mesh"] == mesh
  assert case["loss"] > 1.0  # a real loss at init (about log 256 per head)
  for key, diff in case["metrics"].items():
    assert diff <= TOL * max(1.0, case["loss"]), (key, diff)
  assert case["params"] <= TOL


@pytest.mark.parametrize("name,mesh", [
    ("lm_tensor4", {"data": 1, "fsdp": 2, "context": 1, "tensor": 4}),
    ("mtp_ring_context2_tensor2", {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}),
])
def test_train_step_on_a_split_mesh_equals_one_device(report, name, mesh):
  check_step_case(report[name], mesh)


@pytest.fixture(scope="module")
def kinds_report(fake_devices):
  proc = support.run_python(["tests/parallel_checks.py", "kinds"], devices=fake_devices)
  assert proc.returncode == 0, support.describe(proc)
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the slow tier: four more train steps on split meshes, one subprocess
@pytest.mark.parametrize("name", ["lckv_data2_fsdp2_tensor2", "yoco_like_data2_fsdp2_tensor2",
                                  "prepbn_data2_fsdp2_tensor2",
                                  "linear_attention_data2_fsdp2_tensor2"])
def test_kinds_train_step_on_a_split_mesh_equals_one_device(kinds_report, name):
  case = kinds_report[name]
  check_step_case(case, {"data": 2, "fsdp": 2, "context": 1, "tensor": 2})
  if name.startswith("prepbn"):  # BatchNorm statistics over the whole (data-split) batch
    assert case["collections"] is not None and case["collections"] <= TOL


@pytest.mark.parametrize("overrides,devices,message", [
    ({"mesh.tensor": 3, "mesh.fsdp": 1}, 3,
     r"mesh.tensor=3 does not divide the vocabulary \(model.vocab_size=256\); pad the vocabulary "
     r"to a multiple of 3, e.g. --model.vocab_size=258"),
    ({"mesh.context": 3, "mesh.fsdp": 1}, 3,
     r"mesh.context=3 does not divide the sequence length \(train.seq_len=64\)"),
])
def test_a_mesh_that_does_not_divide_the_model_is_refused(overrides, devices, message):
  config = override(get_config("lm", "smoke"), overrides)
  mesh = type("Mesh", (), {"shape": dict(zip(("data", "fsdp", "context", "tensor"),
                                              config.mesh.shape(devices), strict=True))})
  with pytest.raises(ConfigError, match=message):
    check_mesh_fits_model(config, mesh)


def test_a_mesh_larger_than_the_devices_is_refused():
  with pytest.raises(ConfigError, match=r"^mesh.tensor=16 needs 16 devices, but there are 8"):
    MeshConfig(fsdp=1, tensor=16).shape(8)


def test_row_chunks_divide_the_rows():
  assert row_chunk(2048) == ROW_CHUNK == 512
  assert row_chunk(32, 8) == 8 and row_chunk(24, 16) == 12
  assert row_chunk(37, 8) == 37  # no divisor near the target: one chunk of all rows

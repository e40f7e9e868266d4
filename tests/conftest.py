"""Session set-up (fast XLA compiles, a shared compilation cache) and the shared smoke run."""

from __future__ import annotations

import json
import os
import shutil
import types

from tests import support

# Before JAX initialises a backend: one host device in this process, fast compiles.
os.environ["XLA_FLAGS"] = support.xla_flags()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", support.cache_dir())
jax.config.update("jax_persistent_cache_min_compile_time_secs", support.CACHE_MIN_COMPILE_S)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# References are float64 numpy: keep float32 matmuls exact on accelerators too (no TF32).
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
  parser.addoption("--fake_devices", type=int, default=support.FAKE_DEVICES,
                   help="CPU devices of the processes that test sharding (default %(default)s)")


@pytest.fixture(scope="session")
def fake_devices(request) -> int:
  """The one setting of how many fake CPU devices (XLA's host platform device count) every
  sharded test's process gets; this process keeps one."""
  return request.config.getoption("--fake_devices")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def pytest_unconfigure(config):
  shutil.rmtree(support.cache_dir(), ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """`launch.py --exp=lm --preset=smoke --steps=6 --log_every=1 --ckpt_every=3`, one device."""
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  flags = (*support.SMOKE_FLAGS, f"--workdir={workdir}")
  proc = support.launch(*flags)
  assert proc.returncode == 0, support.describe(proc)
  return types.SimpleNamespace(
      workdir=workdir, proc=proc, flags=flags,
      summary=json.loads((workdir / "summary.json").read_text()),
      config=json.loads((workdir / "config.json").read_text()),
      metrics=support.read_jsonl(workdir / "metrics.jsonl"))


@pytest.fixture(scope="session")
def mtp_smoke_run(tmp_path_factory):
  """`launch.py --exp=mtp` with the smoke run's flags, one device: the MTP experiment's summary
  and the one-device reference of the sharded multi-token run."""
  workdir = tmp_path_factory.mktemp("mtp") / "run"
  proc = support.launch("--exp=mtp", *support.SMOKE_FLAGS[1:], f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  return types.SimpleNamespace(
      workdir=workdir, summary=json.loads((workdir / "summary.json").read_text()),
      metrics=support.read_jsonl(workdir / "metrics.jsonl"))

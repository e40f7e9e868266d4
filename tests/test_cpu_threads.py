"""The XLA:CPU thread reservation for fake host devices (jaxtricks/cpu_threads.py); the run that
needed it (blockwise attention and SLoPe adapters on 8 devices) is in tests/sharded_runs.py."""

import pytest

from jaxtricks import cpu_threads
from tests import support


@pytest.mark.parametrize("env,count", [
    ({}, 1),
    ({"XLA_FLAGS": "--xla_backend_optimization_level=0"}, 1),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, 8),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                   "--xla_force_host_platform_device_count=4"}, 4),
    ({"JAX_NUM_CPU_DEVICES": "6"}, 6),
    ({"JAX_NUM_CPU_DEVICES": "auto"}, 1),
])
def test_host_device_count(env, count):
  assert cpu_threads.host_device_count(env) == count


def test_reserves_four_threads_per_device_or_the_cores():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert cpu_threads.reserve_collective_threads(env, cores=2) == 32
  assert env["NPROC"] == "32"
  env = {"JAX_NUM_CPU_DEVICES": "2"}
  assert cpu_threads.reserve_collective_threads(env, cores=64) == 64
  assert env["NPROC"] == "64"


@pytest.mark.parametrize("env", [{}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                                 {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                                  "NPROC": "3"}])
def test_leaves_one_device_and_a_users_setting_alone(env):
  before = dict(env)
  assert cpu_threads.reserve_collective_threads(env, cores=2) is None
  assert env == before


def test_importing_jaxtricks_sets_it_before_the_backend_starts():
  code = ("import os, jax, jaxtricks; "
          "print(os.environ['NPROC'], jax.device_count())")
  proc = support.run_python(["-c", code], devices=8, env={"NPROC": ""})
  assert proc.returncode == 0, support.describe(proc)
  threads, devices = proc.stdout.split()
  assert devices == "8" and int(threads) >= 32

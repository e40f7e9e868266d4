"""Enough XLA:CPU threads for the collectives of several fake host devices.

XLA's CPU client runs every device's program on one shared thread pool of
`max(DefaultThreadPoolSize(), device_count)` threads, where DefaultThreadPoolSize is the
environment variable `NPROC` if set, else the core count. A collective (all-reduce, all-to-all)
holds its thread until every device has joined its rendezvous, and the thunk executor runs
independent thunks of one program concurrently. So with N fake devices on a machine of fewer
than N cores the pool has exactly N threads, and one device running two collectives at once
leaves another device without a thread to reach either: the program deadlocks and XLA aborts
after its rendezvous timeout (seen with the blockwise attention's all-to-all beside the
optimizer's all-reduce on 8 devices of a 2-core machine).

`reserve_collective_threads` sets `NPROC` before a backend starts, to `max(cores, 4 N)` when more
than one host device is asked for (`--xla_force_host_platform_device_count=N` in XLA_FLAGS, or
`JAX_NUM_CPU_DEVICES`). Idle pool threads cost nothing measurable; a value of `NPROC` the user
set is kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

THREADS_PER_DEVICE = 4
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def host_device_count(env: Mapping[str, str]) -> int:
  """The number of CPU devices `env` asks XLA for (1 if it asks for none); the last flag wins."""
  counts = _DEVICE_COUNT.findall(env.get("XLA_FLAGS", ""))
  requested = [int(counts[-1])] if counts else []
  if env.get("JAX_NUM_CPU_DEVICES", "").strip().isdigit():
    requested.append(int(env["JAX_NUM_CPU_DEVICES"]))
  return max(requested, default=1)


def reserve_collective_threads(env: MutableMapping[str, str] = os.environ,
                               cores: int | None = None) -> int | None:
  """Sets `env["NPROC"]` for the host device count `env` asks for, unless it is set or one device
  is asked for; returns the pool size XLA will use when this sets it, else None."""
  devices = host_device_count(env)
  if devices <= 1 or env.get("NPROC"):
    return None
  threads = max(cores or os.cpu_count() or 1, THREADS_PER_DEVICE * devices)
  env["NPROC"] = str(threads)
  return threads

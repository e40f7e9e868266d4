"""Run by tests/test_sharding.py in a process with 8 CPU devices: the smoke run of the shared
one-device reference under two meshes, then each run's parameter layout as JSON on stdout; and
the multi-token and SLoPe smoke runs under FSDP.

    python tests/sharded_runs.py WORKDIR
"""

import json
import pathlib
import sys

import jax

from experiments import get_config
from jaxtricks.config import override
from jaxtricks.train.loop import train
from tests.support import SMOKE_OVERRIDES

SLOPE_OVERRIDES = {"model.projection": "slope", "model.projection.adapter_rank": 2,
                   "model.projection.adapter_start": 0.5}

MESHES = {
    "fsdp8": {},  # the default: mesh.fsdp=-1 takes all 8 devices
    "data2_fsdp2_tensor2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
}


def layout(tree) -> dict:
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[jax.tree_util.keystr(path)] = {
        "shape": list(x.shape),
        "shard_shape": list(x.addressable_shards[0].data.shape),
        "n_devices": len(x.sharding.device_set),
        "spec": [None if s is None else s if isinstance(s, str) else list(s)
                 for s in x.sharding.spec],
    }
  return out


def main(workdir: str) -> None:
  report = {"device_count": jax.device_count()}
  for name, mesh in MESHES.items():
    config = override(get_config("lm", "smoke"), {**SMOKE_OVERRIDES, **mesh})
    result = train(config, str(pathlib.Path(workdir) / name))
    report[name] = {"mesh": dict(result.mesh.shape), "params": layout(result.state.params),
                    "mu": layout(result.state.opt_state), "summary_val_loss":
                    result.summary["val_loss"]}
  # The multi-token model: its memory-efficient loss (a custom VJP over a scan) under FSDP.
  config = override(get_config("mtp", "smoke"), SMOKE_OVERRIDES)
  train(config, str(pathlib.Path(workdir) / "mtp_fsdp8"))
  # SLoPe with lazy adapters: custom VJPs, kept-only optimizer state and the late adapter step.
  config = override(get_config("lm", "smoke"), {**SMOKE_OVERRIDES, **SLOPE_OVERRIDES})
  train(config, str(pathlib.Path(workdir) / "slope_fsdp8"))
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1])

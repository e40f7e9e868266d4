"""Run by tests/test_sharded_runs.py in a process with the fake CPU devices: the smoke run of the
shared one-device reference under two meshes, then each run's parameter layout as JSON on stdout;
the multi-token and SLoPe smoke runs under FSDP; and the one-device smoke run's checkpoint of
step 3 resumed here on every device (a topology change, 1 -> 8).

    python tests/sharded_runs.py WORKDIR ONE_DEVICE_SMOKE_WORKDIR
"""

import json
import pathlib
import shutil
import sys

import jax

from experiments import get_config
from jaxtricks.config import override
from jaxtricks.train.loop import train
from tests.support import SMOKE_OVERRIDES

# Blockwise attention too: its all-to-all beside the optimizer's all-reduce once deadlocked the
# XLA:CPU thread pool on 8 fake devices (jaxtricks/cpu_threads.py).
SLOPE_OVERRIDES = {"model.projection": "slope", "model.projection.adapter_rank": 2,
                   "model.projection.adapter_start": 0.5, "model.attention.impl": "blockwise",
                   "model.attention.block_size": 32}

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


def resume_elsewhere(source: pathlib.Path, target: pathlib.Path, step: int) -> None:
  """Copies a finished run's workdir without its checkpoints after `step` and its summary, as if
  it had stopped at `step` (the input of a resume)."""
  shutil.copytree(source, target)
  for path in (target / "checkpoints").iterdir():
    if path.name.isdigit() and int(path.name) > step:
      shutil.rmtree(path)
  (target / "summary.json").unlink(missing_ok=True)


def main(workdir: str, one_device_workdir: str) -> None:
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
  # SLoPe with lazy adapters (custom VJPs, kept-only optimizer state, the late adapter step) and
  # blockwise attention.
  config = override(get_config("lm", "smoke"), {**SMOKE_OVERRIDES, **SLOPE_OVERRIDES})
  train(config, str(pathlib.Path(workdir) / "slope_fsdp8"))
  # 1 -> all devices: the one-device run's step-3 checkpoint continued on the default mesh.
  resumed = pathlib.Path(workdir) / "resume_1_to_all"
  resume_elsewhere(pathlib.Path(one_device_workdir), resumed, step=3)
  result = train(override(get_config("lm", "smoke"), SMOKE_OVERRIDES), str(resumed))
  report["resume_1_to_all"] = {"mesh": dict(result.mesh.shape)}
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])

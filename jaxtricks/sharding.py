"""Device mesh, logical-axis rules and multi-process initialisation.

Axes ('data', 'fsdp', 'context', 'tensor'): the batch is split over data and fsdp and its sequence
over context (context parallelism: ring attention, jaxtricks.ops.ring_attention); parameters are
sharded by logical axis names (set on every parameter by the layers) through rules, FSDP by
default, and the unembedding's vocabulary over tensor (the vocabulary-parallel loss).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxtricks.errors import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical axis -> mesh axes. The batch goes over data and fsdp, weights' model dimension over fsdp
# (ZeRO-3 style), the wide dimensions over tensor.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("embed_out", None),  # the output side of a D -> D projection (multi-token heads)
    ("mtp_in", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 means 'all remaining devices' (at most one axis may say so)."""
  data: int = 1
  fsdp: int = -1
  context: int = 1   # splits every sequence (use model.attention.impl=ring)
  tensor: int = 1    # splits heads, MLP width and the vocabulary

  def sizes(self) -> tuple[int, ...]:
    return tuple(getattr(self, name) for name in MESH_AXES)

  def validate(self) -> None:
    sizes = self.sizes()
    if sum(s == -1 for s in sizes) > 1:
      raise ConfigError("mesh: at most one of mesh.data/fsdp/context/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh: sizes must be positive or -1, got {self}")

  def shape(self, n_devices: int) -> tuple[int, ...]:
    sizes = list(self.sizes())
    known = int(np.prod([s for s in sizes if s != -1]))
    split = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True) if s > 1]
    named = "*".join(split) + (f" = {known}" if len(split) > 1 else "")
    if known > n_devices:
      raise ConfigError(f"{named} needs {known} devices, but there are {n_devices}")
    if -1 in sizes:
      if n_devices % known:
        raise ConfigError(f"{n_devices} devices are not divisible by {named}")
      sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
      raise ConfigError(f"mesh: data*fsdp*context*tensor = {int(np.prod(sizes))} but there are "
                        f"{n_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Any = None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  return ("data", "fsdp")


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """(B, T) batch arrays: rows over the batch axes, positions over context."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), "context"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_to_spec(logical: PartitionSpec | tuple | None, shape: tuple[int, ...],
                    mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec, replicating dimensions the mesh does not divide."""
  if logical is None or len(logical) == 0:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape, strict=True):
    axes = table.get(name)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    size = 1
    for ax in axes:
      if ax in used or mesh.shape[ax] == 1 or dim % (size * mesh.shape[ax]):
        continue
      kept.append(ax)
      size *= mesh.shape[ax]
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: jax.sharding.Mesh,
                   rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree, given a parallel tree of logical PartitionSpecs (or None)."""
  def one(names, leaf):
    return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, rules))
  return jax.tree.map(one, logical_tree, abstract_tree,
                      is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls jax.distributed.initialize() when flags or the environment ask for several processes.

  Flags win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a cluster
  that JAX detects itself (TPU pods, SLURM) when JAXTRICKS_DISTRIBUTED=1.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in env:
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  if coordinator_address is None and env.get("JAXTRICKS_DISTRIBUTED") != "1":
    return False
  logging.info("jax.distributed.initialize(coordinator=%s, processes=%s, id=%s)",
               coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True

"""Mesh shapes and logical-axis rules (the sharded runs themselves: tests/test_sharded_runs.py)."""

import types

import pytest
from jax.sharding import PartitionSpec as P

from jaxtricks.errors import ConfigError
from jaxtricks.sharding import MeshConfig, data_parallel_size, logical_to_spec


@pytest.mark.parametrize("cfg,devices,shape", [
    (MeshConfig(), 8, (1, 8, 1, 1)),
    (MeshConfig(), 1, (1, 1, 1, 1)),
    (MeshConfig(data=2), 8, (2, 4, 1, 1)),
    (MeshConfig(data=2, fsdp=2, tensor=2), 8, (2, 2, 1, 2)),
    (MeshConfig(data=-1, fsdp=1, tensor=4), 8, (2, 1, 1, 4)),
    (MeshConfig(context=4), 8, (1, 2, 4, 1)),
])
def test_mesh_shape(cfg, devices, shape):
  cfg.validate()
  assert cfg.shape(devices) == shape


@pytest.mark.parametrize("cfg,devices,message", [
    (MeshConfig(data=3), 8, "8 devices are not divisible by mesh.data=3"),
    (MeshConfig(data=2, fsdp=2, tensor=1), 8,
     "data\\*fsdp\\*context\\*tensor = 4 but there are 8 devices"),
    (MeshConfig(data=2, fsdp=1, context=4, tensor=2), 8,
     "mesh.data=2\\*mesh.context=4\\*mesh.tensor=2 = 16 needs 16 devices, but there are 8"),
])
def test_mesh_that_does_not_cover_the_devices_is_refused(cfg, devices, message):
  with pytest.raises(ConfigError, match=message):
    cfg.shape(devices)


@pytest.mark.parametrize("cfg", [MeshConfig(data=-1, fsdp=-1), MeshConfig(tensor=0),
                                 MeshConfig(data=-2)])
def test_invalid_mesh_config(cfg):
  with pytest.raises(ConfigError):
    cfg.validate()


# what the rules read
MESH = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "context": 1, "tensor": 2})


@pytest.mark.parametrize("logical,shape,expected", [
    (("vocab", "embed"), (256, 64), P("tensor", "fsdp")),
    (("embed", "heads", "head_dim"), (64, 4, 16), P("fsdp", "tensor", None)),
    (("embed", "heads", "head_dim"), (64, 3, 16), P("fsdp", None, None)),  # 3 heads: replicated
    (("embed", "mlp"), (6, 8), P(None, "tensor")),  # 6 is not divisible by fsdp=4
    (("norm",), (64,), P(None)),
    (("batch", "embed"), (16, 64), P(("data", "fsdp"), None)),  # fsdp is already used
    (("batch",), (2, ), P("data")),  # 2 rows: only the data axis divides them
    (("unknown_axis",), (8,), P(None)),
    (None, (3, 3), P()),
])
def test_logical_to_spec(logical, shape, expected):
  assert logical_to_spec(logical, shape, MESH) == expected


def test_data_parallel_size():
  assert data_parallel_size(MESH) == 8

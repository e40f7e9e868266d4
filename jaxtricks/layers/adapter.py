"""Fine-tuning adapters as projection components: a frozen pretrained kernel W plus a small
trained update, y = x W + x dW(theta), folded into W by merging (W' = W + dW).

`AdapterProjection` is the base of the adapter kinds (LoRA, MoRA, SPP, SPAFIT): it names the
projections it adapts (`targets`, by module name: q, k, v, o, gate, up, down), freezes every
parameter except its own (`trains`), loads the dense model it adapts (`base`), and merges by
the kind's explicit `delta_weight`. A kind gives `delta(module, x_RxI, w_IxO)`, creating its
parameters in the layer's scope, and `delta_weight(params, w_IxO)` for the same update as a
matrix. The layer keeps the dense `Linear`'s kernel name, shape and axes, so a pretrained
checkpoint loads into it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from jaxtricks.errors import ConfigError
from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.layers.linear import DenseProjection, Linear
from jaxtricks.registry import Component

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class AdaptedLinear(Linear):
  """`Linear` whose output gains the adapter's update where the adapter applies."""
  adapter: Any = None   # an AdapterProjection
  layer: int = 0        # the block, of `depth`
  depth: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_shape = x.shape[-self.in_ndim:]
    kernel = self.make_kernel(in_shape, self.adapter.kernel_init(self.std, self.in_ndim))
    dtype = resolve_dtype(self.dtype)
    n_in, n_out = math.prod(in_shape), math.prod(self.features)
    batch_shape = x.shape[:x.ndim - self.in_ndim]
    x_RxI = x.astype(dtype).reshape(-1, n_in)
    w_IxO = kernel.astype(dtype).reshape(n_in, n_out)
    if self.adapter.applies(self):
      y_RxO = self.adapter.forward(self, x_RxI, w_IxO)
    else:
      y_RxO = x_RxI @ w_IxO
    return y_RxO.reshape(*batch_shape, *self.features)

  def adapter_param(self, name: str, init: Callable, shape: tuple[int, ...]) -> jnp.ndarray:
    """An adapter parameter in the layer's scope, cast to the compute dtype."""
    value = self.param(name, init, shape, resolve_dtype(self.param_dtype))
    return value.astype(resolve_dtype(self.dtype))


def block_of(path: tuple[str, ...], depth: int) -> int:
  """The block index of a parameter path (multi-token heads count as the last block)."""
  top = path[0]
  return int(top.split("_")[1]) if top.startswith("block_") else depth - 1


def layer_dims(model: Any, name: str) -> tuple[int, int]:
  """(n_in, n_out) of the flattened matrix of projection `name`."""
  d, h = model.d_model, model.dim_per_head
  q, kv = model.attention.n_heads * h, model.attention.kv_heads * h
  f = model.mlp.width(model) if model.mlp.has_projections else 0
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
          "down": (f, d)}[name]


@dataclasses.dataclass(frozen=True)
class AdapterProjection(Component):
  """Base of the adapter kinds (not registered itself)."""
  targets: tuple[str, ...] = PROJECTIONS
  param_names: ClassVar[tuple[str, ...]] = ()   # the kind's own parameters in a layer
  folded: ClassVar[tuple[str, ...] | None] = None  # those merged into W (None: all)

  def kernel_init(self, std: float, in_ndim: int) -> Callable | None:
    """The frozen kernel's initialiser (None: the dense layer's); only used without
    --init_from."""
    del std, in_ndim
    return None

  def applies(self, module: AdaptedLinear) -> bool:
    """Whether this layer is adapted (its name, block and the depth are on `module`)."""
    return module.name in self.targets

  def forward(self, module: AdaptedLinear, x_RxI: jnp.ndarray, w_IxO: jnp.ndarray
              ) -> jnp.ndarray:
    return x_RxI @ w_IxO + self.delta(module, x_RxI, w_IxO)

  def delta(self, module: AdaptedLinear, x_RxI: jnp.ndarray, w_IxO: jnp.ndarray
            ) -> jnp.ndarray:
    """x dW (R, O), creating the kind's parameters with `module.adapter_param`."""
    raise NotImplementedError

  def delta_weight(self, params: dict, w_IxO: jnp.ndarray) -> jnp.ndarray:
    """dW (I, O) of one layer from its adapter parameters {name: array}."""
    raise NotImplementedError

  def factory(self, model: Any, layer: int, where: str) -> Callable[..., nn.Module]:
    del where
    return functools.partial(AdaptedLinear, adapter=self, layer=layer, depth=model.depth)

  def base(self) -> Component:
    return DenseProjection()

  def trains(self, model: Any, path: tuple[str, ...]) -> bool:
    del model
    return path[-1] in self.param_names

  def merged_component(self, model: Any) -> Component:
    del model
    return DenseProjection()

  def merged(self, model: Any, params: dict) -> tuple[Component, dict]:
    """Every adapted kernel W + dW; the folded adapter parameters removed."""
    flat = traverse_util.flatten_dict(params)
    folded = self.param_names if self.folded is None else self.folded
    modules = {p[:-1] for p in flat if p[-1] in folded}
    for module in modules:
      kernel = flat[(*module, "kernel")]
      own = {name: flat.pop((*module, name)) for name in folded if (*module, name) in flat}
      w_IxO = self._matrix(kernel, module)
      merged_IxO = w_IxO + self.delta_weight(own, w_IxO).astype(w_IxO.dtype)
      flat[(*module, "kernel")] = merged_IxO.reshape(kernel.shape)
    return self.merged_component(model), traverse_util.unflatten_dict(flat)

  @staticmethod
  def _matrix(kernel: jnp.ndarray, module: tuple[str, ...]) -> jnp.ndarray:
    in_ndim = 2 if module[-1] == "o" else 1   # o contracts (heads, head_dim)
    return kernel.reshape(math.prod(kernel.shape[:in_ndim]), -1)

  def validate(self, model: Any) -> None:
    if not self.targets or set(self.targets) - set(PROJECTIONS):
      raise ConfigError(f"model.projection.targets={self.targets} must be a non-empty subset "
                        f"of {', '.join(PROJECTIONS)}")
    mlp = ("gate", "up", "down")
    if not model.mlp.has_projections and set(self.targets) <= set(mlp):
      raise ConfigError(f"model.projection.targets={self.targets} are MLP projections, but "
                        f"model.mlp={model.mlp.kind!r} has none")

  def check_rank(self, model: Any, rank: int, targets: tuple[str, ...], what: str) -> None:
    """Rank >= 1 and at most the smallest side of every adapted layer."""
    dims = {name: layer_dims(model, name) for name in targets
            if model.mlp.has_projections or name in ("q", "k", "v", "o")}
    smallest = min(dims, key=lambda name: min(dims[name]))
    if rank < 1 or rank > min(dims[smallest]):
      raise ConfigError(f"{what}={rank} must be in 1..{min(dims[smallest])} (the smaller side "
                        f"of the {smallest} projection, {dims[smallest][0]} x "
                        f"{dims[smallest][1]})")

"""SwiGLU feed-forward block (Shazeer 2020, arXiv 2002.05202): (silu(x W_g) * (x W_u)) W_o."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.layers.linear import Linear
from jaxtricks.registry import Component, register


class SwiGLU(nn.Module):
  d_ff: int
  n_layers: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  projection: Callable[..., nn.Module] = Linear  # the model's projection kind (dense, N:M, ...)

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no train-only behaviour
    d = x_BxTxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    Linear = self.projection  # noqa: N806
    gate_BxTxF = Linear((self.d_ff,), ("embed", "mlp"), std=d ** -0.5, name="gate", **kw)(x_BxTxD)
    up_BxTxF = Linear((self.d_ff,), ("embed", "mlp"), std=d ** -0.5, name="up", **kw)(x_BxTxD)
    # Output projections scaled by 1/sqrt(2 L) keep the residual stream's variance O(1) (GPT-2).
    std = (self.d_ff * 2 * self.n_layers) ** -0.5
    return Linear((d,), ("mlp", "embed"), std=std, name="down", **kw)(
        jax.nn.silu(gate_BxTxF) * up_BxTxF)


@register("mlp", "swiglu")
@dataclasses.dataclass(frozen=True)
class SwiGLUConfig(Component):
  d_ff: int = 0  # 0 means 8/3 d_model rounded up to a multiple of 32
  has_projections: ClassVar[bool] = True  # its matmuls go through the projection component

  def width(self, model: Any) -> int:
    return self.d_ff or -(-8 * model.d_model // 3 // 32) * 32

  def validate(self, model: Any) -> None:
    if self.d_ff < 0:
      raise ConfigError(f"model.mlp.d_ff must be >= 0, got {self.d_ff}")

  def build(self, model: Any, projection: Callable) -> nn.Module:
    return SwiGLU(self.width(model), n_layers=model.n_layers, dtype=model.dtype,
                  param_dtype=model.param_dtype, projection=projection, name="mlp")

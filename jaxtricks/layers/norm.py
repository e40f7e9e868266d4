"""RMSNorm module over jaxtricks.ops.norm.rms_norm (arXiv 1910.07467), and the `rms` kind of the
`norm` slot: the normalisation at every norm site of the Transformer (before attention, before
the MLP, the K/V norm of cross-layer producers and the final norm).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.ops.norm import rms_norm
from jaxtricks.registry import Component, register


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no train-only behaviour
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), resolve_dtype(self.param_dtype))
    return rms_norm(x, scale, self.eps)


@register("norm", "rms")
@dataclasses.dataclass(frozen=True)
class RMSNormConfig(Component):
  """RMSNorm with `model.norm_eps` at every norm site (the default)."""

  def build(self, model: Any, name: str | None = None) -> nn.Module:
    """The norm module of one site, called as `norm(x, train=...)`."""
    return RMSNorm(eps=model.norm_eps, param_dtype=model.param_dtype, name=name)

"""RMSNorm module over jaxtricks.ops.norm.rms_norm (arXiv 1910.07467)."""

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.ops.norm import rms_norm


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), resolve_dtype(self.param_dtype))
    return rms_norm(x, scale, self.eps)

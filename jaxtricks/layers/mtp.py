"""Linear multi-token prediction heads (Gloeckle et al. 2024, arXiv 2404.19737, Table S5 "linear").

Head i maps the trunk output z to z + z W_i before the shared final norm and unembedding; W_i
starts small, so every head starts as a copy of the next-token head and learns its offset.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.layers.linear import Linear


class ResidualLinearHead(nn.Module):
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, z_BxTxD: jnp.ndarray) -> jnp.ndarray:
    d = z_BxTxD.shape[-1]
    w = Linear((d,), ("embed", "embed_out"), std=0.02 * d ** -0.5, dtype=self.dtype,
               param_dtype=self.param_dtype, name="proj")
    return z_BxTxD + w(z_BxTxD)

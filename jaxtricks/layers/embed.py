"""Token embedding and the untied output projection (unembedding)."""

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.layers.linear import Linear


class Embed(nn.Module):
  vocab_size: int
  d_model: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, tokens_BxT: jnp.ndarray) -> jnp.ndarray:
    table_VxD = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.vocab_size, self.d_model), resolve_dtype(self.param_dtype))
    return jnp.take(table_VxD, tokens_BxT, axis=0).astype(resolve_dtype(self.dtype))


class LinearHead(nn.Module):
  """logits_BxTxV = x_BxTxD W_DxV (untied from the embedding)."""
  vocab_size: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
    return Linear((self.vocab_size,), ("embed", "vocab"), std=x_BxTxD.shape[-1] ** -0.5,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="unembed")(x_BxTxD)

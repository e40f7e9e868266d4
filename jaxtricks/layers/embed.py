"""Token embedding and the untied output projection (unembedding), and their component configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.layers.linear import Linear
from jaxtricks.registry import Component, register


class Embed(nn.Module):
  vocab_size: int
  d_model: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (self.vocab_size, self.d_model), resolve_dtype(self.param_dtype))

  def __call__(self, tokens_BxT: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Embeddings (B, T, D); `train` lets an embedding kind add train-only behaviour."""
    del train
    return jnp.take(self.embedding, tokens_BxT, axis=0).astype(resolve_dtype(self.dtype))


class LinearHead(nn.Module):
  """logits_BxTxV = x_BxTxD W_DxV (untied from the embedding)."""
  vocab_size: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
    return Linear((self.vocab_size,), ("embed", "vocab"), std=x_BxTxD.shape[-1] ** -0.5,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="unembed")(x_BxTxD)


@register("embed", "token")
@dataclasses.dataclass(frozen=True)
class TokenEmbedConfig(Component):
  """A learned (V, D) table, unit-normal at init."""

  def build(self, model: Any) -> nn.Module:
    return Embed(model.vocab_size, model.d_model, dtype=model.dtype,
                 param_dtype=model.param_dtype)


@register("head", "linear")
@dataclasses.dataclass(frozen=True)
class LinearHeadConfig(Component):
  """An untied (D, V) unembedding."""

  def build(self, model: Any) -> nn.Module:
    return LinearHead(model.vocab_size, dtype=model.dtype, param_dtype=model.param_dtype)

  def unembedding(self, head_params: dict) -> jnp.ndarray:
    """The (D, V) matrix with logits = x W, for losses that split it over the vocabulary
    (jaxtricks.train.vocab_loss); a head kind without one is never split."""
    return head_params["unembed"]["kernel"]

"""Medusa heads (Cai et al. 2024, arXiv 2401.10774, eq. 1): head k of the `mtp` slot predicts token
t + k from the trunk's last hidden state h_t through a residual block,

    p_t^(k) = softmax(W_unembed norm(h_t + SiLU(h_t W_k))),

W_k (D, D) initialised at zero, so every head starts as a copy of the next-token head. The Medusa
code offers a per-head LM head or one shared with the base model; we share the model's final norm
and unembedding (fewer parameters, and heads 2..n then differ from head 1 only by W_k). The heads
read only h_t, so they draft in parallel from one state and need no cache.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxtricks.errors import ConfigError
from jaxtricks.layers.mtp import MultiTokenHeads, ResidualLinearHead
from jaxtricks.registry import register


@register("mtp", "medusa")
@dataclasses.dataclass(frozen=True)
class MedusaHeads(MultiTokenHeads):
  heads: int = 4

  def validate(self, model) -> None:
    super().validate(model)
    if self.heads < 2:
      raise ConfigError(f"model.mtp=medusa needs model.mtp.heads >= 2 (the next-token head plus "
                        f"at least one Medusa head), got {self.heads}")

  def build(self, model, block):
    del block
    return [ResidualLinearHead(dtype=model.dtype, param_dtype=model.param_dtype, std_scale=0.0,
                               activation=jax.nn.silu, name=f"mtp_{i}")
            for i in range(1, self.heads)]

  def states(self, heads, trunk, tokens_BxT, embed, cache, new_cache, n, train):
    return [head(trunk.x_BxTxD) for head in heads[:n - 1]]

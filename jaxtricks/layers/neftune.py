"""NEFTune: noisy embeddings during training (Jain et al. 2023, arXiv 2310.05914, Algorithm 1).

In training the embeddings X (B, T, D) of a sequence of length T get uniform noise,

    X + alpha / sqrt(T D) * eps,   eps ~ Uniform(-1, 1)^(B x T x D),

drawn from the `noise` PRNG stream; evaluation and decoding see X unchanged. The table is the
token embedding's (`embed/embedding`), so a checkpoint of either kind loads into the other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.layers.embed import Embed, TokenEmbedConfig
from jaxtricks.registry import Component, register


class NoisyEmbed(Embed):
  alpha: float = 5.0

  def __call__(self, tokens_BxT: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x_BxTxD = super().__call__(tokens_BxT)
    if not train or self.alpha == 0:
      return x_BxTxD
    t, d = x_BxTxD.shape[-2:]
    eps_BxTxD = jax.random.uniform(self.make_rng("noise"), x_BxTxD.shape, jnp.float32, -1.0, 1.0)
    return x_BxTxD + (self.alpha / math.sqrt(t * d) * eps_BxTxD).astype(x_BxTxD.dtype)


@register("embed", "neftune")
@dataclasses.dataclass(frozen=True)
class NEFTuneEmbedConfig(Component):
  """The token embedding with NEFTune's training noise (`--model.embed=neftune`)."""
  neftune_alpha: float = 5.0    # the paper's alpha: 5, 10 or 15
  rng_streams: ClassVar[tuple[str, ...]] = ("noise",)

  def base(self) -> Component:
    return TokenEmbedConfig()

  def merged(self, model: Any, params: dict) -> tuple[Component, dict]:
    return TokenEmbedConfig(), params  # the noise is off outside training

  def validate(self, model: Any) -> None:
    if self.neftune_alpha < 0:
      raise ConfigError(f"model.embed.neftune_alpha must be >= 0, got {self.neftune_alpha}")

  def build(self, model: Any) -> nn.Module:
    return NoisyEmbed(model.vocab_size, model.d_model, dtype=model.dtype,
                      param_dtype=model.param_dtype, alpha=self.neftune_alpha)

"""LoRA: low-rank adaptation of a frozen projection (Hu et al. 2021, arXiv 2106.09685).

    y = x W + (alpha / r) (x A) B,   A (d_in, r) ~ U(-1/sqrt(d_in), 1/sqrt(d_in)),  B (r, d_out) = 0

so the adapted model equals the pretrained one at step 0; W is frozen, A and B train. A's draw is
PEFT's (kaiming-uniform with a = sqrt 5); rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales
by alpha / sqrt(r) instead. Merging: W' = W + (alpha / r) A B, no inference cost. Adapter dropout
is not implemented.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.layers.adapter import AdaptedLinear, AdapterProjection
from jaxtricks.registry import register


def uniform_fan_in(key, shape, dtype=jnp.float32):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = shape[0] (PEFT's LoRA A)."""
  bound = shape[0] ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_params(module: AdaptedLinear, n_in: int, n_out: int, rank: int
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(A (n_in, r), B (r, n_out)) of one layer."""
  a_IxR = module.adapter_param("lora_a", uniform_fan_in, (n_in, rank))
  b_RxO = module.adapter_param("lora_b", nn.initializers.zeros, (rank, n_out))
  return a_IxR, b_RxO


@register("projection", "lora")
@dataclasses.dataclass(frozen=True)
class LoRAProjection(AdapterProjection):
  """Rank-r adapters A B on the `targets` projections of every block."""
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False           # scale alpha / sqrt(r) instead of alpha / r
  param_names: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def delta(self, module, x_RxI, w_IxO):
    a_IxR, b_RxO = lora_params(module, *w_IxO.shape, self.rank)
    return (x_RxI @ a_IxR) @ b_RxO * self.scale

  def delta_weight(self, params, w_IxO):
    return params["lora_a"] @ params["lora_b"] * self.scale

  def validate(self, model: Any) -> None:
    super().validate(model)
    self.check_rank(model, self.rank, self.targets, "model.projection.rank")

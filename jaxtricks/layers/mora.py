"""MoRA: high-rank updating with a square matrix (Jiang et al. 2024, arXiv 2405.12130).

    y = x W + f_decomp(f_comp(x) M),   M (r^, r^) = 0 at init, no alpha

with r^ = floor(sqrt((d_in + d_out) r)), so that a layer trains at most as many parameters as
LoRA at rank r (jaxtricks.ops.mora: the operators and the rank). Default operator: rotation
(the paper's type 6) below LoRA rank 128, sharing (type 1) from there, as the authors recommend
for small and large ranks; `operator` picks one of truncation, sharing, decoupling, rotation.
W is frozen; merging adds the operators' explicit matrix dW to W.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from jaxtricks.errors import ConfigError
from jaxtricks.layers.adapter import AdapterProjection, layer_dims
from jaxtricks.ops import mora
from jaxtricks.registry import register


@register("projection", "mora")
@dataclasses.dataclass(frozen=True)
class MoRAProjection(AdapterProjection):
  """A square r^ x r^ update between parameter-free operators on the `targets` projections."""
  rank: int = 8                  # the LoRA rank whose trainable count r^ matches
  operator: str = "auto"         # auto | truncation | sharing | decoupling | rotation
  param_names: ClassVar[tuple[str, ...]] = ("mora_m",)

  @property
  def resolved_operator(self) -> str:
    return mora.default_operator(self.rank) if self.operator == "auto" else self.operator

  def square(self, n_in: int, n_out: int) -> int:
    return mora.mora_rank(n_in, n_out, self.rank, self.resolved_operator)

  def delta(self, module, x_RxI, w_IxO):
    n_in, n_out = w_IxO.shape
    r_hat = self.square(n_in, n_out)
    m_HxH = module.adapter_param("mora_m", nn.initializers.zeros, (r_hat, r_hat))
    return mora.mora_delta(x_RxI, m_HxH, n_out, self.resolved_operator)

  def delta_weight(self, params, w_IxO):
    return mora.mora_delta_weight(params["mora_m"], *w_IxO.shape, self.resolved_operator)

  def validate(self, model: Any) -> None:
    super().validate(model)
    if self.operator != "auto" and self.operator not in mora.OPERATORS:
      raise ConfigError(f"model.projection.operator={self.operator!r} is unknown; valid: auto, "
                        f"{', '.join(mora.OPERATORS)}")
    self.check_rank(model, self.rank, self.targets, "model.projection.rank")
    for name in self.targets:
      if model.mlp.has_projections or name in ("q", "k", "v", "o"):
        try:
          self.square(*layer_dims(model, name))
        except ValueError as e:
          raise ConfigError(f"model.projection (MoRA) on {name}: {e}") from None

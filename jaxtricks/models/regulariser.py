"""The `regulariser` slot: a component that adds a term to the training objective from the model's
own computation (its hidden states) and has no parameters. Its term is a `loss_term` hook
(jaxtricks.train.hooks) of its config class; `none`, the default, adds nothing. A regulariser
shapes pretraining only: its base (what fine-tuning starts from) is `none`.
"""

from __future__ import annotations

import dataclasses

from jaxtricks.registry import Component, register


@dataclasses.dataclass(frozen=True)
class Regulariser(Component):
  """Base of the regulariser kinds: no parameters, nothing to fold, the plain model's base."""

  def base(self) -> Component:
    return NoRegulariser()


@register("regulariser", "none")
@dataclasses.dataclass(frozen=True)
class NoRegulariser(Regulariser):
  """No extra term (the default)."""

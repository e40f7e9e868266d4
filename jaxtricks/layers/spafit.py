"""SPAFIT: stratified progressive adaptation fine-tuning (Arora & Wang 2024, arXiv 2405.00201),
and BitFit, the bias-only fine-tuning of its middle group (Ben Zaken et al. 2021,
arXiv 2106.10199).

SPAFIT splits the blocks bottom to top into three groups (`groups` = their sizes): the first is
frozen, the second trains bias terms only, the third trains LoRA adapters on the attention
projections (`lora_targets`) and the biases. Our projections have no biases, so SPAFIT adds
zero-initialised ones (bias adapters, y = x W + b) to every projection of the second and third
groups: the adapted model starts equal to the pretrained one. Merging folds LoRA into W and keeps
the biases: the merged model is a `bitfit` one (dense kernels with biases on those blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from jaxtricks.errors import ConfigError
from jaxtricks.layers.adapter import (
  PROJECTIONS,
  AdaptedLinear,
  AdapterProjection,
  block_of,
)
from jaxtricks.layers.lora import lora_params
from jaxtricks.registry import Component, register


def add_bias(module: AdaptedLinear, y_RxO):
  return y_RxO + module.adapter_param("bias", nn.initializers.zeros, (y_RxO.shape[-1],))


@register("projection", "bitfit")
@dataclasses.dataclass(frozen=True)
class BitFitProjection(AdapterProjection):
  """Dense kernels plus a trained bias on the `targets` projections of `blocks` (() = all)."""
  blocks: tuple[int, ...] = ()
  param_names: ClassVar[tuple[str, ...]] = ("bias",)

  folded: ClassVar[tuple[str, ...]] = ()

  def applies(self, module):
    return module.name in self.targets and (not self.blocks or module.layer in self.blocks)

  def forward(self, module, x_RxI, w_IxO):
    return add_bias(module, x_RxI @ w_IxO)

  def merged(self, model, params):
    return self, params

  def validate(self, model: Any) -> None:
    super().validate(model)
    bad = [b for b in self.blocks if not 0 <= b < model.depth]
    if bad:
      raise ConfigError(f"model.projection.blocks={self.blocks}: no block {bad[0]} in a model of "
                        f"{model.depth} blocks")


@register("projection", "spafit")
@dataclasses.dataclass(frozen=True)
class SPAFITProjection(AdapterProjection):
  """Frozen / bias-only / LoRA-plus-bias groups of blocks, bottom to top."""
  groups: tuple[int, ...] = ()   # (frozen, bias, lora) block counts; () = thirds, lora rounded up
  rank: int = 8
  alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o")
  param_names: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b", "bias")
  folded: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b")

  def sizes(self, depth: int) -> tuple[int, int, int]:
    if self.groups:
      return tuple(self.groups)
    third = depth // 3
    return third, third, depth - 2 * third

  def group(self, depth: int, layer: int) -> int:
    """0 frozen, 1 bias-only, 2 LoRA and biases."""
    frozen, bias, _ = self.sizes(depth)
    return 0 if layer < frozen else 1 if layer < frozen + bias else 2

  def applies(self, module):
    return module.name in self.targets and self.group(module.depth, module.layer) > 0

  def forward(self, module, x_RxI, w_IxO):
    y_RxO = x_RxI @ w_IxO
    if self.group(module.depth, module.layer) == 2 and module.name in self.lora_targets:
      a_IxR, b_RxO = lora_params(module, *w_IxO.shape, self.rank)
      y_RxO = y_RxO + (x_RxI @ a_IxR) @ b_RxO * (self.alpha / self.rank)
    return add_bias(module, y_RxO)

  def delta_weight(self, params, w_IxO):
    return params["lora_a"] @ params["lora_b"] * (self.alpha / self.rank)

  def trains(self, model, path):
    return path[-1] in self.param_names and self.group(model.depth,
                                                       block_of(path, model.depth)) > 0

  def merged_component(self, model) -> Component:
    """Biases stay where SPAFIT put them: every block above the frozen group."""
    frozen = self.sizes(model.depth)[0]
    return BitFitProjection(targets=self.targets, blocks=tuple(range(frozen, model.depth)))

  def validate(self, model: Any) -> None:
    super().validate(model)
    if self.groups and (len(self.groups) != 3 or min(self.groups) < 0
                        or sum(self.groups) != model.depth):
      raise ConfigError(f"model.projection.groups={self.groups} must be three block counts "
                        f"(frozen, bias-only, LoRA) adding up to the depth, {model.depth}")
    if set(self.lora_targets) - set(self.targets) or set(self.lora_targets) - set(PROJECTIONS):
      raise ConfigError(f"model.projection.lora_targets={self.lora_targets} must be among "
                        f"model.projection.targets={self.targets}")
    if self.sizes(model.depth)[2]:
      self.check_rank(model, self.rank, self.lora_targets, "model.projection.rank")

"""Model components: the Transformer's swappable parts, each a small frozen config dataclass that
is chosen by name in its slot of `ModelConfig` (`model.mlp=kan`, `model.projection=slope`).

A component kind is registered with `@register(slot, kind)` on its config class, which lives
beside its layer and owns `validate(model)`; the builders (`build`, `factory`) and the hooks the
rest of the stack reads are methods of that class, and the hooks of later stages (optimizer
transforms, loss terms) are registries keyed by the class (jaxtricks.train.hooks). The
Transformer, the optimizer, the losses and the decode cache loop over `ModelConfig.components()`
and never name a kind. `jaxtricks.components` imports every kind so that all are registered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

SLOTS = ("embed", "attention", "mlp", "head", "mtp", "projection", "norm", "regulariser")
KINDS: dict[str, dict[str, type]] = {slot: {} for slot in SLOTS}


class Component:
  """Base of every component config (a frozen dataclass). `slot` and `kind` are set by
  `register`; the defaults below are what a component without the hook contributes."""
  slot: ClassVar[str] = ""
  kind: ClassVar[str] = ""
  # PRNG streams the component's modules draw from in training (Flax `rngs` names).
  rng_streams: ClassVar[tuple[str, ...]] = ()
  # Flax variable collections besides `params` that the train state carries (updated by the
  # train step's forward pass: jaxtricks.train.collections); others made at init are dropped.
  collections: ClassVar[tuple[str, ...]] = ()

  def validate(self, model: Any) -> None:
    """Raises ConfigError naming `model.<slot>.<field>` for a bad value; `model` is the whole
    ModelConfig (for checks against the width, depth or other components)."""

  def trains(self, model: Any, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (its keys under `params`) trains; a parameter that some
    component does not train is frozen (held apart from the optimizer, jaxtricks.train.state)."""
    del model, path
    return True

  def base(self) -> Component:
    """The component whose parameters this one starts from when fine-tuning (`--init_from`): a
    kind that adapts or perturbs another names it (LoRA: dense; NEFTune: token). Two models
    whose components have equal bases hold the same pretrained parameters."""
    return self

  def merged(self, model: Any, params: dict) -> tuple[Component, dict]:
    """(the component of the merged model, `params` with this component's own parameters
    folded into plain weights); a component without any returns itself and `params`."""
    del model
    return self, params

  def merged_with(self, model: Any, params: dict, collections: dict) -> tuple[Component, dict]:
    """`merged` for a component that also folds variable collections besides `params` (the
    running statistics of a BatchNorm) into plain weights."""
    del collections
    return self.merged(model, params)

  def adopt(self, model: Any, params: dict) -> dict:
    """Pretrained parameters of the base model made into this component's (after its own
    freshly initialised ones are added): a check, or a projection such as N:M pruning."""
    del model
    return params

  def layers_removed(self, model: Any) -> int:
    """Trunk layers this component takes away from `model.n_layers` (compute matching)."""
    del model
    return 0

  def cache_entries(self, model: Any, batch: int, max_len: int, mtp_heads: int) -> dict:
    """Decode-cache arrays this component's modules read and write, by module name."""
    del model, batch, max_len, mtp_heads
    return {}


def register(slot: str, kind: str) -> Callable[[type], type]:
  """Class decorator: makes the config class the `kind` of `slot`."""
  def wrap(cls: type) -> type:
    if slot not in KINDS:
      raise ValueError(f"unknown component slot {slot!r}; valid: {', '.join(SLOTS)}")
    if kind in KINDS[slot]:
      raise ValueError(f"{slot} kind {kind!r} is registered twice")
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, Component)):
      raise TypeError(f"{cls.__name__} must be a dataclass subclassing Component")
    cls.slot, cls.kind = slot, kind
    KINDS[slot][kind] = cls
    return cls
  return wrap


def kinds(slot: str) -> dict[str, type]:
  """{kind: config class} of `slot`, every registered kind loaded, in alphabetical order (not
  import order, which depends on what was imported first)."""
  import jaxtricks.components  # noqa: F401, PLC0415 (registers every kind)

  return dict(sorted(KINDS[slot].items()))


def is_component(value: Any) -> bool:
  return isinstance(value, Component) and dataclasses.is_dataclass(value)

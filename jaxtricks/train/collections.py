"""Variable collections besides `params` (Flax: e.g. `batch_stats`, the running statistics of a
BatchNorm) through training and evaluation.

A component whose modules keep such variables creates them at `model.init`; the train state
carries them (`TrainState.model_collections()`, checkpointed and sharded like the parameters).
The train and eval steps hand the losses `bind_collections(model, ...)`: the same model, whose
`apply` also reads the collections and, in training, lets the forward pass update them (Flax
`mutable`); the updated values (`updated_collections`, the last `apply`'s) go back into the state
beside the optimizer's update. The losses keep calling `model.apply({"params": params}, ...)`
and never name a collection. A model without collections is passed through untouched.
"""

from __future__ import annotations

from typing import Any


class BoundCollections:
  """`module` (a Transformer) whose `apply` reads `collections` and, with `update`, updates them;
  every other attribute is the module's."""

  def __init__(self, module: Any, collections: dict, update: bool):
    self.module, self.collections, self.update = module, collections, update
    self.updated = collections

  def __getattr__(self, name: str) -> Any:
    return getattr(self.module, name)

  def apply(self, variables: dict, *args, **kwargs) -> Any:
    variables = {**self.collections, **variables}
    if not self.update:
      return self.module.apply(variables, *args, **kwargs)
    out, new = self.module.apply(variables, *args, mutable=list(self.collections), **kwargs)
    self.updated = {**self.updated, **new}
    return out


def bind_collections(model: Any, collections: dict, update: bool) -> Any:
  """`model` reading (and with `update`, updating) `collections`; `model` itself without any."""
  return BoundCollections(model, collections, update) if collections else model


def updated_collections(bound: Any) -> dict:
  """The collections after the forward passes of a `bind_collections` model ({} without)."""
  return bound.updated if isinstance(bound, BoundCollections) else {}

"""The registries of the training stages: losses by name (`register_loss`), and what components
add, by component config class: optimizer transforms (`optimizer_hook`) and extra loss terms with
their metrics (`loss_term`). A trick's train-side module registers here; `make_optimizer` and the
losses apply every hook of the model's components and never name a trick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import optax

OPTIMIZER_HOOKS: dict[type, Callable[[OptimizerParts, Any], None]] = {}
LOSS_TERMS: dict[type, Callable] = {}
LOSS_CONTEXTS: dict[type, Callable] = {}
LOSSES: dict[str, Callable] = {}   # train.loss name -> loss_fn (jaxtricks.train.losses)


def register_loss(name: str) -> Callable:
  """Registers `loss_fn(model, params, batch, train, rngs) -> (loss, metrics)` as `name`."""
  def wrap(fn: Callable) -> Callable:
    if name in LOSSES:
      raise ValueError(f"loss {name!r} is registered twice")
    LOSSES[name] = fn
    return fn
  return wrap


@dataclasses.dataclass
class OptimizerParts:
  """The optimizer being assembled: `first` transforms run on the raw gradients (before global-norm
  clipping), then `core`; each of `wrappers` then wraps the whole chain, in order."""
  train: Any                    # TrainConfig
  model: Any                    # the Transformer (its config and parameter structure)
  schedule: optax.Schedule
  adamw: Callable[[optax.Schedule], optax.GradientTransformation]
  core: optax.GradientTransformation
  first: list[optax.GradientTransformation] = dataclasses.field(default_factory=list)
  wrappers: list[Callable[[optax.GradientTransformation], optax.GradientTransformation]] = (
      dataclasses.field(default_factory=list))


def _register(table: dict, component_cls: type) -> Callable:
  def wrap(fn: Callable) -> Callable:
    if component_cls in table:
      raise ValueError(f"{component_cls.__name__} has two hooks of one kind")
    table[component_cls] = fn
    return fn
  return wrap


def optimizer_hook(component_cls: type) -> Callable:
  """`fn(parts: OptimizerParts, component)` edits the optimizer for models with that component."""
  return _register(OPTIMIZER_HOOKS, component_cls)


def loss_term(component_cls: type) -> Callable:
  """`fn(component, model, params, batch, train) -> (scalar, {metric: scalar})`: added to the
  objective of every loss for models with that component; its metrics are logged."""
  return _register(LOSS_TERMS, component_cls)


def loss_context(component_cls: type) -> Callable:
  """`fn(component, model, train) -> context manager` entered around every call of the run's
  loss for models with that component: what it records of the loss's own forward pass (hidden
  states through `flax.linen.intercept_methods`) its loss term can read instead of running the
  model again."""
  return _register(LOSS_CONTEXTS, component_cls)


def with_contexts(loss_fn: Callable) -> Callable:
  """`loss_fn` run inside the loss contexts of the model's components (the loss the train and
  eval steps call); a loss called without them gives the same value."""
  @functools.wraps(loss_fn)
  def wrapped(model, params, batch, train: bool = False, rngs: dict | None = None):
    with contextlib.ExitStack() as stack:
      for component in model.config.components():
        fn = LOSS_CONTEXTS.get(type(component))
        if fn is not None:
          stack.enter_context(fn(component, model, train))
      return loss_fn(model, params, batch, train, rngs)
  return wrapped


def with_terms(model, params, batch, train: bool, loss, metrics: dict) -> tuple[Any, dict]:
  """`loss` plus the components' loss terms; metrics gain theirs and `objective` (the sum), and
  `loss` stays the data term."""
  extra, extra_metrics = loss_terms(model, params, batch, train)
  if not extra_metrics:
    return loss, metrics
  return loss + extra, {**metrics, **extra_metrics, "objective": loss + extra}


def loss_terms(model, params, batch, train: bool) -> tuple[Any, dict]:
  """The sum of the model's components' loss terms (0.0 without any) and their metrics."""
  total, metrics = 0.0, {}
  for component in model.config.components():
    fn = LOSS_TERMS.get(type(component))
    if fn is not None:
      value, extra = fn(component, model, params, batch, train)
      total, metrics = total + value, {**metrics, **extra}
  return total, metrics

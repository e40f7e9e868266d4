"""Loss functions by name. A trick that changes the objective registers one here; a component
that adds a term to every objective registers it in jaxtricks.train.hooks.

A loss is `loss_fn(model, params, batch, train, rngs) -> (scalar loss, dict of scalar metrics)`:
`train` is False in evaluation (deterministic: no train-only behaviour), and `rngs` holds a key
for each of `model.config.rng_streams` in training (None in evaluation).
"""

from collections.abc import Callable

import jax.numpy as jnp

import jaxtricks.components  # noqa: F401 (registers every component's loss terms)
from jaxtricks.ops.losses import accuracy, cross_entropy
from jaxtricks.ops.mtp import (
  head_weights,
  heads_cross_entropy,
  heads_cross_entropy_naive,
  shift_targets,
)
from jaxtricks.train.hooks import loss_terms

LOSSES: dict[str, Callable] = {}


def register_loss(name: str):
  def wrap(fn: Callable) -> Callable:
    LOSSES[name] = fn
    return fn
  return wrap


def _with_terms(model, params, batch, train, loss, metrics) -> tuple[jnp.ndarray, dict]:
  """Adds the components' loss terms; `loss` stays the data term when there are any."""
  extra, extra_metrics = loss_terms(model, params, batch, train)
  if not extra_metrics:
    return loss, metrics
  return loss + extra, {**metrics, **extra_metrics, "objective": loss + extra}


@register_loss("lm")
def lm_loss(model, params, batch, train: bool = False, rngs: dict | None = None
            ) -> tuple[jnp.ndarray, dict]:
  """Next-token cross entropy in nats per token (per byte for the byte corpus)."""
  logits_BxTxV = model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)
  total, count = cross_entropy(logits_BxTxV, batch["targets"], batch.get("weights"))
  correct, _ = accuracy(logits_BxTxV, batch["targets"], batch.get("weights"))
  loss = total / count
  return _with_terms(model, params, batch, train, loss,
                     {"loss": loss, "accuracy": correct / count})


def _mtp_loss(model, params, batch, train, rngs, efficient: bool) -> tuple[jnp.ndarray, dict]:
  cfg = model.config
  n = cfg.mtp.heads
  h_NxBxTxD = model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs,
                          method="heads_hidden")
  targets_NxBxT, weights_NxBxT = shift_targets(batch["targets"], batch.get("weights"), n)
  shared = {"final_norm": params["final_norm"], "head": params["head"]}
  project = lambda p, h_BxTxD: model.apply({"params": p}, h_BxTxD, method="project")
  fn = heads_cross_entropy if efficient else heads_cross_entropy_naive
  objective, per_head = fn(project, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT,
                           head_weights(n, cfg.mtp.loss_lambda))
  metrics = {"loss": objective, "accuracy": per_head["accuracy"][0]}
  for i in range(n):
    metrics[f"loss_head{i + 1}"] = per_head["loss"][i]
    metrics[f"accuracy_head{i + 1}"] = per_head["accuracy"][i]
  return _with_terms(model, params, batch, train, objective, metrics)


@register_loss("mtp")
def mtp_loss(model, params, batch, train: bool = False, rngs: dict | None = None
             ) -> tuple[jnp.ndarray, dict]:
  """Multi-token prediction (arXiv 2404.19737), memory-efficient: one head's logits at a time.

  metrics: loss (the weighted sum over heads), accuracy (head 1), loss_head{i}, accuracy_head{i}.
  """
  return _mtp_loss(model, params, batch, train, rngs, efficient=True)


@register_loss("mtp_naive")
def mtp_naive_loss(model, params, batch, train: bool = False, rngs: dict | None = None
                   ) -> tuple[jnp.ndarray, dict]:
  """The same objective with every head's logits alive at once (reference and benchmark)."""
  return _mtp_loss(model, params, batch, train, rngs, efficient=False)

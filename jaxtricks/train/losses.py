"""Loss functions by name. A trick that changes the objective registers one here.

A loss is `loss_fn(model, params, batch, rng) -> (scalar loss, dict of scalar metrics)`.
"""

from collections.abc import Callable

import jax.numpy as jnp

from jaxtricks.ops.losses import accuracy, cross_entropy
from jaxtricks.ops.mtp import (
    head_weights,
    heads_cross_entropy,
    heads_cross_entropy_naive,
    shift_targets,
)

LOSSES: dict[str, Callable] = {}


def register_loss(name: str):
  def wrap(fn: Callable) -> Callable:
    LOSSES[name] = fn
    return fn
  return wrap


@register_loss("lm")
def lm_loss(model, params, batch, rng) -> tuple[jnp.ndarray, dict]:
  """Next-token cross entropy in nats per token (per byte for the byte corpus)."""
  del rng
  logits_BxTxV = model.apply({"params": params}, batch["inputs"])
  total, count = cross_entropy(logits_BxTxV, batch["targets"], batch.get("weights"))
  correct, _ = accuracy(logits_BxTxV, batch["targets"], batch.get("weights"))
  loss = total / count
  return loss, {"loss": loss, "accuracy": correct / count}


def _mtp_loss(model, params, batch, efficient: bool) -> tuple[jnp.ndarray, dict]:
  cfg = model.config
  n = cfg.mtp_heads
  h_NxBxTxD = model.apply({"params": params}, batch["inputs"], method="heads_hidden")
  targets_NxBxT, weights_NxBxT = shift_targets(batch["targets"], batch.get("weights"), n)
  shared = {"final_norm": params["final_norm"], "head": params["head"]}
  project = lambda p, h_BxTxD: model.apply({"params": p}, h_BxTxD, method="project")
  fn = heads_cross_entropy if efficient else heads_cross_entropy_naive
  objective, per_head = fn(project, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT,
                           head_weights(n, cfg.mtp_lambda))
  metrics = {"loss": objective, "accuracy": per_head["accuracy"][0]}
  for i in range(n):
    metrics[f"loss_head{i + 1}"] = per_head["loss"][i]
    metrics[f"accuracy_head{i + 1}"] = per_head["accuracy"][i]
  return objective, metrics


@register_loss("mtp")
def mtp_loss(model, params, batch, rng) -> tuple[jnp.ndarray, dict]:
  """Multi-token prediction (arXiv 2404.19737), memory-efficient: one head's logits at a time.

  metrics: loss (the weighted sum over heads), accuracy (head 1), loss_head{i}, accuracy_head{i}.
  """
  del rng
  return _mtp_loss(model, params, batch, efficient=True)


@register_loss("mtp_naive")
def mtp_naive_loss(model, params, batch, rng) -> tuple[jnp.ndarray, dict]:
  """The same objective with every head's logits alive at once (reference and benchmark)."""
  del rng
  return _mtp_loss(model, params, batch, efficient=False)

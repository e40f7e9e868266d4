"""Loss functions by name. A trick that changes the objective registers one here.

A loss is `loss_fn(model, params, batch, rng) -> (scalar loss, dict of scalar metrics)`.
"""

from collections.abc import Callable

import jax.numpy as jnp

from jaxtricks.ops.losses import accuracy, cross_entropy

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

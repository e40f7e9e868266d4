"""Loss functions by name (`LOSSES`) and the next-token loss. A trick that changes the objective
registers its loss with `register_loss` in a module of its own (the multi-token losses:
jaxtricks.train.mtp_loss), listed in jaxtricks.components; a component that adds a term to every
objective registers it in jaxtricks.train.hooks.

A loss is `loss_fn(model, params, batch, train, rngs) -> (scalar loss, dict of scalar metrics)`:
`train` is False in evaluation (deterministic: no train-only behaviour), and `rngs` holds a key
for each of `model.config.rng_streams` in training (None in evaluation).
"""

import jax.numpy as jnp

import jaxtricks.components  # noqa: F401 (registers every loss and component loss term)
from jaxtricks.ops.losses import accuracy, cross_entropy
from jaxtricks.train import vocab_loss
from jaxtricks.train.hooks import LOSSES, register_loss, with_terms

__all__ = ["LOSSES", "lm_loss", "register_loss", "with_terms"]


@register_loss("lm")
def lm_loss(model, params, batch, train: bool = False, rngs: dict | None = None
            ) -> tuple[jnp.ndarray, dict]:
  """Next-token cross entropy in nats per token (per byte for the byte corpus); computed
  vocabulary-parallel (never forming the whole logits) when the mesh splits the vocabulary."""
  if vocab_loss.active(model):
    x_BxTxD = model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs,
                          method="hidden")
    total, correct, count = vocab_loss.weighted_sums(model, params["head"], x_BxTxD,
                                                     batch["targets"], batch.get("weights"))
  else:
    logits_BxTxV = model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)
    total, count = cross_entropy(logits_BxTxV, batch["targets"], batch.get("weights"))
    correct, _ = accuracy(logits_BxTxV, batch["targets"], batch.get("weights"))
  loss = total / count
  return with_terms(model, params, batch, train, loss,
                     {"loss": loss, "accuracy": correct / count})

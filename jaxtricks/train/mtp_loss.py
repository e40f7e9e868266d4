"""The multi-token prediction losses (Gloeckle et al. 2024, arXiv 2404.19737), registered as
`--train.loss=mtp` (memory-efficient: one head's logits alive at a time, and only a vocabulary
slice of them per device when the mesh splits the vocabulary) and `mtp_naive` (every
head's logits at once; the reference and the benchmark's baseline). Head i of the model's
`mtp.heads` predicts token t + i and weighs 1 (head 1) or mtp.loss_lambda / (n - 1) when
loss_lambda > 0.
"""

import jax
import jax.numpy as jnp

from jaxtricks.ops.mtp import (
  draft_acceptance,
  head_weights,
  heads_cross_entropy,
  heads_cross_entropy_naive,
  shift_targets,
)
from jaxtricks.train import vocab_loss
from jaxtricks.train.hooks import register_loss, with_terms


def _mtp_loss(model, params, batch, train, rngs, efficient: bool) -> tuple[jnp.ndarray, dict]:
  cfg = model.config
  n = cfg.mtp.heads
  h_NxBxTxD = model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs,
                          method="heads_hidden")
  targets_NxBxT, weights_NxBxT = shift_targets(batch["targets"], batch.get("weights"), n)
  shared = {"final_norm": params["final_norm"], "head": params["head"]}
  project = lambda p, h_BxTxD: model.apply({"params": p}, h_BxTxD, method="project")
  head_w = head_weights(n, cfg.mtp.loss_lambda)
  if efficient:
    split = vocab_loss.head_loss(model) if vocab_loss.active(model) else None
    objective, per_head = heads_cross_entropy(project, shared, h_NxBxTxD, targets_NxBxT,
                                              weights_NxBxT, head_w, head_loss=split)
  else:
    objective, per_head = heads_cross_entropy_naive(project, shared, h_NxBxTxD, targets_NxBxT,
                                                    weights_NxBxT, head_w)
  metrics = {"loss": objective, "accuracy": per_head["accuracy"][0]}
  for i in range(n):
    metrics[f"loss_head{i + 1}"] = per_head["loss"][i]
    metrics[f"accuracy_head{i + 1}"] = per_head["accuracy"][i]
  if not train and n > 1:  # evaluation: the drafts' acceptance, one head's logits at a time
    preds_NxBxT = jax.lax.map(lambda h: jnp.argmax(project(shared, h), axis=-1), h_NxBxTxD)
    accept_K, expected = draft_acceptance(preds_NxBxT, weights_NxBxT)
    for k in range(1, n):
      metrics[f"accept_{k + 1}"] = accept_K[k - 1]
    metrics["expected_tokens_per_forward"] = expected
  return with_terms(model, params, batch, train, objective, metrics)


@register_loss("mtp")
def mtp_loss(model, params, batch, train: bool = False, rngs: dict | None = None
             ) -> tuple[jnp.ndarray, dict]:
  """Multi-token prediction (arXiv 2404.19737), memory-efficient: one head's logits at a time.

  metrics: loss (the weighted sum over heads), accuracy (head 1), loss_head{i}, accuracy_head{i};
  in evaluation also accept_{k} (head k's argmax equal to the next-token head's at the position
  verifying it, as MaxText logs it) and expected_tokens_per_forward (chain drafting from them).
  """
  return _mtp_loss(model, params, batch, train, rngs, efficient=True)


@register_loss("mtp_naive")
def mtp_naive_loss(model, params, batch, train: bool = False, rngs: dict | None = None
                   ) -> tuple[jnp.ndarray, dict]:
  """The same objective with every head's logits alive at once (reference and benchmark)."""
  return _mtp_loss(model, params, batch, train, rngs, efficient=False)

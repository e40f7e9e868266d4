"""Next-token losses through the vocabulary-parallel cross entropy (jaxtricks.ops.vocab_parallel)
when the current mesh splits the vocabulary (mesh.tensor > 1) and the model's head is a plain
(D, V) unembedding (its component has `unembedding(head_params)`): each device then computes
only its slice of the logits. The next-token loss and the memory-efficient multi-token loss (per
head) go through here; elsewhere the logits are formed whole as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtricks import sharding
from jaxtricks.ops.vocab_parallel import vocab_parallel_cross_entropy


def active(model) -> bool:
  """Whether the loss of `model` is computed vocabulary-parallel under the current mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return (not mesh.empty and "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1
          and hasattr(model.config.head, "unembedding"))


def weighted_sums(model, head_params: dict, x_BxTxD: jnp.ndarray, targets_BxT: jnp.ndarray,
                  weights_BxT: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(sum of losses, number correct, sum of weights) of final-normed states `x_BxTxD`, as
  ops.losses.cross_entropy and accuracy of the head's logits give them."""
  mesh = jax.sharding.get_abstract_mesh()
  w_DxV = model.config.head.unembedding(head_params).astype(x_BxTxD.dtype)
  loss_BxT, correct_BxT = vocab_parallel_cross_entropy(
      x_BxTxD, w_DxV, targets_BxT, vocab_axis="tensor", batch_axes=sharding.batch_axes(mesh),
      seq_axis="context")
  if weights_BxT is None:
    weights_BxT = jnp.ones_like(loss_BxT)
  return jnp.sum(loss_BxT * weights_BxT), jnp.sum(correct_BxT * weights_BxT), jnp.sum(weights_BxT)


def head_loss(model):
  """ops.mtp's per-head loss for `model`: (shared params, pre-norm state, targets, weights) ->
  (mean loss, accuracy), through the shared final norm and the split unembedding."""
  def loss(shared, h_BxTxD, targets_BxT, weights_BxT):
    x_BxTxD = model.apply({"params": shared}, h_BxTxD, method=lambda m, h: m.final_norm(h))
    total, correct, count = weighted_sums(model, shared["head"], x_BxTxD, targets_BxT,
                                          weights_BxT)
    count = jnp.maximum(count, 1.0)
    return total / count, correct / count
  return loss

"""Token-level cross entropy in float32: -log softmax(logits)[target], masked; accuracy.

Shape contract (chex, at trace time): logits (B, T, V), targets and weights (B, T).
"""

import chex
import jax
import jax.numpy as jnp


def cross_entropy(logits_BxTxV: jnp.ndarray, targets_BxT: jnp.ndarray,
                  weights_BxT: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Returns (sum of per-token losses, sum of weights); divide for the mean in nats per token."""
  _check_targets("cross_entropy", logits_BxTxV, targets_BxT, weights_BxT)
  logits = logits_BxTxV.astype(jnp.float32)
  logz_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  loss_BxT = logz_BxT - target_logit_BxT
  if weights_BxT is None:
    weights_BxT = jnp.ones_like(loss_BxT)
  return jnp.sum(loss_BxT * weights_BxT), jnp.sum(weights_BxT)


def accuracy(logits_BxTxV: jnp.ndarray, targets_BxT: jnp.ndarray,
             weights_BxT: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Returns (number of correct argmax predictions, sum of weights)."""
  _check_targets("accuracy", logits_BxTxV, targets_BxT, weights_BxT)
  correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(jnp.float32)
  if weights_BxT is None:
    weights_BxT = jnp.ones_like(correct_BxT)
  return jnp.sum(correct_BxT * weights_BxT), jnp.sum(weights_BxT)


def _check_targets(name: str, logits_BxTxV, targets_BxT, weights_BxT) -> None:
  chex.assert_rank(logits_BxTxV, 3, custom_message=f"{name}: logits_BxTxV")
  b, t, _ = logits_BxTxV.shape
  chex.assert_shape(targets_BxT, (b, t), custom_message=f"{name}: targets_BxT")
  if weights_BxT is not None:
    chex.assert_shape(weights_BxT, (b, t), custom_message=f"{name}: weights_BxT")

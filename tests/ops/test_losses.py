"""Cross entropy and accuracy against numpy, eagerly and under jit (chex variants: float32 logits
from bfloat16, the optional weights), and their chex shape contract."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.ops.losses import accuracy, cross_entropy


def numpy_token_losses(logits, targets):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  b, t = targets.shape
  return -np.array([[log_probs[i, j, targets[i, j]] for j in range(t)] for i in range(b)])


class LossesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_cross_entropy_matches_numpy_with_and_without_weights(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, size=(3, 7))
    weights = (rng.random((3, 7)) < 0.6).astype(np.float32)
    per_token = numpy_token_losses(logits, targets)
    xent = self.variant(cross_entropy)

    total, count = xent(jnp.asarray(logits), jnp.asarray(targets))
    chex.assert_trees_all_close(total, per_token.sum(), rtol=1e-5)
    assert float(count) == 21

    total, count = xent(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    chex.assert_trees_all_close(total, (per_token * weights).sum(), rtol=1e-5)
    assert float(count) == weights.sum()

  @chex.variants(with_jit=True, without_jit=True)
  def test_cross_entropy_is_stable_for_large_bfloat16_logits(self):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 1e4
    targets = rng.integers(0, 5, size=(2, 3))
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    total, _ = self.variant(cross_entropy)(logits_bf16, jnp.asarray(targets))
    expected = numpy_token_losses(np.asarray(logits_bf16.astype(jnp.float32)), targets).sum()
    chex.assert_tree_all_finite(total)
    chex.assert_trees_all_close(total, expected, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_accuracy_matches_numpy(self):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6, 9)).astype(np.float32)
    targets = rng.integers(0, 9, size=(4, 6))
    targets[:, ::2] = logits.argmax(-1)[:, ::2]  # make about half of them right
    weights = (rng.random((4, 6)) < 0.5).astype(np.float32)
    right = (logits.argmax(-1) == targets).astype(np.float64)
    acc = self.variant(accuracy)
    correct, count = acc(jnp.asarray(logits), jnp.asarray(targets))
    assert (float(correct), float(count)) == (right.sum(), 24)
    correct, count = acc(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    assert (float(correct), float(count)) == ((right * weights).sum(), weights.sum())

  @chex.variants(with_jit=True, without_jit=True)
  def test_shape_contracts_are_checked_while_tracing(self):
    logits, targets = jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32)
    for name, fn in (("cross_entropy", cross_entropy), ("accuracy", accuracy)):
      f = self.variant(fn)
      with pytest.raises(AssertionError, match=rf"\[{name}: logits_BxTxV\]"):
        f(logits[0], targets)
      with pytest.raises(AssertionError, match=rf"\[{name}: targets_BxT\]"):
        f(logits, targets[:, :2])
      with pytest.raises(AssertionError, match=rf"\[{name}: weights_BxT\]"):
        f(logits, targets, jnp.ones((2, 1)))

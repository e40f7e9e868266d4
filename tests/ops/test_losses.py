"""Cross entropy and accuracy against numpy."""

import jax.numpy as jnp
import numpy as np

from jaxtricks.ops.losses import accuracy, cross_entropy


def numpy_token_losses(logits, targets):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  b, t = targets.shape
  return -np.array([[log_probs[i, j, targets[i, j]] for j in range(t)] for i in range(b)])


def test_cross_entropy_matches_numpy_with_and_without_weights():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 4
  targets = rng.integers(0, 11, size=(3, 7))
  weights = (rng.random((3, 7)) < 0.6).astype(np.float32)
  per_token = numpy_token_losses(logits, targets)

  total, count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(float(total), per_token.sum(), rtol=1e-5)
  assert float(count) == 21

  total, count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(float(total), (per_token * weights).sum(), rtol=1e-5)
  assert float(count) == weights.sum()


def test_cross_entropy_is_stable_for_large_bfloat16_logits():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 1e4
  targets = rng.integers(0, 5, size=(2, 3))
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  total, _ = cross_entropy(logits_bf16, jnp.asarray(targets))
  expected = numpy_token_losses(np.asarray(logits_bf16.astype(jnp.float32)), targets).sum()
  assert np.isfinite(float(total))
  np.testing.assert_allclose(float(total), expected, rtol=1e-4)


def test_accuracy_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 6, 9)).astype(np.float32)
  targets = rng.integers(0, 9, size=(4, 6))
  targets[:, ::2] = logits.argmax(-1)[:, ::2]  # make about half of them right
  weights = (rng.random((4, 6)) < 0.5).astype(np.float32)
  right = (logits.argmax(-1) == targets).astype(np.float64)
  correct, count = accuracy(jnp.asarray(logits), jnp.asarray(targets))
  assert (float(correct), float(count)) == (right.sum(), 24)
  correct, count = accuracy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  assert (float(correct), float(count)) == ((right * weights).sum(), weights.sum())

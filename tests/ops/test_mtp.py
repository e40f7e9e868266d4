"""Multi-token prediction maths: target shifting, head weights, the memory-efficient loss against
the naive one, and the speculative acceptance rules against hand cases and a sampling test; the
chex shape contracts. Shifting, the custom-VJP loss and the acceptance rules run eagerly and
under jit (chex variants)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxtricks.ops import mtp


def test_head_weights():
  np.testing.assert_array_equal(mtp.head_weights(4), [1, 1, 1, 1])
  np.testing.assert_allclose(mtp.head_weights(4, 0.3), [1, 0.1, 0.1, 0.1])
  np.testing.assert_array_equal(mtp.head_weights(1, 0.3), [1])


def _problem(n=3, b=2, t=6, d=8, v=11, seed=0):
  rng = np.random.default_rng(seed)
  shared = {"w": jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
            "s": jnp.asarray(rng.normal(size=(d,)), jnp.float32)}
  h = jnp.asarray(rng.normal(size=(n, b, t, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (n, b, t)), jnp.int32)
  weights = jnp.asarray(rng.random((n, b, t)) > 0.3, jnp.float32)
  return _project, shared, h, targets, weights


def _project(p, h_BxTxD):
  return jnp.tanh(h_BxTxD * p["s"]) @ p["w"]


def _value_and_grads(fn, shared, h, targets, weights, head_w):
  """(objective, metrics) and the gradients for the shared parameters and the head states."""
  f = lambda s, x: fn(_project, s, x, targets, weights, head_w)  # noqa: E731
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(shared, h)


def _numpy_objective(shared, h, targets, weights, head_w):
  w, s = np.asarray(shared["w"], np.float64), np.asarray(shared["s"], np.float64)
  total = 0.0
  for i in range(h.shape[0]):
    logits = np.tanh(np.asarray(h[i], np.float64) * s) @ w
    logz = np.log(np.exp(logits).sum(-1))
    nll = logz - np.take_along_axis(logits, np.asarray(targets[i])[..., None], -1)[..., 0]
    wi = np.asarray(weights[i], np.float64)
    total += head_w[i] * (nll * wi).sum() / max(wi.sum(), 1)
  return total


class MTPVariantsTest(chex.TestCase):
  """Eager and jitted: Python loops over heads, the custom-VJP scan, the acceptance rules."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_shift_targets_masks_positions_past_the_end(self):
    targets = np.arange(10).reshape(2, 5)
    weights = np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], np.float32)
    shift = self.variant(mtp.shift_targets, static_argnums=2)
    t, w = shift(jnp.asarray(targets), jnp.asarray(weights), 3)
    chex.assert_shape([t, w], (3, 2, 5))
    for i in range(3):  # head i + 1 at position p reads target p + i
      for p in range(5):
        expect_w = weights[:, p + i] if p + i < 5 else np.zeros(2)
        chex.assert_trees_all_equal(w[i, :, p], expect_w)
        if p + i < 5:
          chex.assert_trees_all_equal(t[i, :, p], targets[:, p + i])
    _, w_default = shift(jnp.asarray(targets), None, 2)
    chex.assert_trees_all_equal(w_default[1], np.array([[1, 1, 1, 1, 0]] * 2))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.3)
  def test_efficient_loss_and_gradients_equal_naive(self, lam):
    _, shared, h, targets, weights = _problem()
    head_w = mtp.head_weights(3, lam)
    grads = {}
    for name, fn in (("naive", mtp.heads_cross_entropy_naive),
                     ("fused", mtp.heads_cross_entropy)):
      (value, metrics), g = self.variant(_value_and_grads, static_argnums=0)(
          fn, shared, h, targets, weights, head_w)
      chex.assert_trees_all_close(value, _numpy_objective(shared, h, targets, weights, head_w),
                                  rtol=1e-5)
      chex.assert_shape([metrics["loss"], metrics["accuracy"]], (3,))
      chex.assert_trees_all_close(jnp.sum(head_w * metrics["loss"]), value, rtol=1e-6)
      grads[name] = g
    chex.assert_trees_all_close(grads["naive"], grads["fused"], rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_greedy_accepts_counts_the_matching_prefix(self):
    accepts = self.variant(mtp.greedy_accepts)
    drafts = jnp.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [5, 2, 3]])
    predicted = jnp.array([[1, 2, 3], [1, 2, 9], [1, 9, 3], [1, 2, 3]])
    chex.assert_trees_all_equal(accepts(drafts, predicted), jnp.array([3, 2, 1, 0]))
    none = jnp.zeros((2, 0), jnp.int32)
    assert accepts(none, none).tolist() == [0, 0]

  @chex.variants(with_jit=True, without_jit=True)
  def test_speculative_accepts_hand_cases(self):
    accepts = self.variant(mtp.speculative_accepts)
    p = jnp.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # target is certain: token 1, then 2
    q = jnp.array([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    n, resample = accepts(p, q, jnp.array([[1, 0]]), jax.random.key(0))
    assert int(n[0]) == 1 and int(resample[0]) == 2  # second draft impossible under p
    n, _ = accepts(p, p, jnp.array([[1, 2]]), jax.random.key(0))
    assert int(n[0]) == 2

  @chex.variants(with_jit=True, without_jit=True)
  def test_shape_contracts_are_checked_while_tracing(self):
    project, shared, h, targets, weights = _problem()
    for fn in (mtp.heads_cross_entropy_naive, mtp.heads_cross_entropy):
      f = self.variant(lambda h, t, w, hw, fn=fn: fn(project, shared, h, t, w, hw))
      name = fn.__name__
      with pytest.raises(AssertionError, match=rf"\[{name}: h_NxBxTxD\]"):
        f(h[0], targets, weights, np.ones(3))
      with pytest.raises(AssertionError, match=rf"\[{name}: targets_NxBxT, weights_NxBxT\]"):
        f(h, targets[:, :, :4], weights, np.ones(3))
      with pytest.raises(AssertionError, match=rf"\[{name}: head_w_N\]"):
        f(h, targets, weights, np.ones(2))
    with pytest.raises(AssertionError, match=r"\[shift_targets: weights\]"):
      self.variant(mtp.shift_targets, static_argnums=2)(targets[0], weights[0, :1], 2)
    with pytest.raises(AssertionError, match=r"\[greedy_accepts\]"):
      self.variant(mtp.greedy_accepts)(jnp.zeros((2, 3)), jnp.zeros((2, 2)))
    p = jnp.full((1, 2, 3), 1 / 3)
    accepts = self.variant(mtp.speculative_accepts)
    with pytest.raises(AssertionError, match=r"\[speculative_accepts: p and q\]"):
      accepts(p, p[..., :2], jnp.zeros((1, 2), jnp.int32), jax.random.key(0))
    with pytest.raises(AssertionError, match=r"\[speculative_accepts: drafts\]"):
      accepts(p, p, jnp.zeros((1, 3), jnp.int32), jax.random.key(0))


def test_efficient_loss_scales_with_the_output_cotangent_and_jits():
  project, shared, h, targets, weights = _problem(seed=1)
  f = lambda s: 2.5 * mtp.heads_cross_entropy(project, s, h, targets, weights, np.ones(3))[0]
  g = lambda s: 2.5 * mtp.heads_cross_entropy_naive(project, s, h, targets, weights,
                                                     np.ones(3))[0]
  chex.assert_trees_all_close(jax.jit(jax.grad(f))(shared)["w"], jax.grad(g)(shared)["w"],
                              rtol=1e-5, atol=1e-6)


def test_efficient_loss_needs_a_third_of_the_temporary_memory():
  naive = mtp.loss_temp_bytes(4, 1, 256, 64, 4096, efficient=False)
  fused = mtp.loss_temp_bytes(4, 1, 256, 64, 4096, efficient=True)
  logits = 256 * 4096 * 4
  assert naive >= 4 * logits  # every head's logits at once
  assert fused <= 0.4 * naive, (fused, naive)


def test_speculative_sampling_keeps_the_target_distribution():
  # One draft x ~ q; the emitted token (x if accepted, else the residual sample) must be ~ p.
  v, rows = 5, 200_000
  p = np.array([0.05, 0.4, 0.25, 0.2, 0.1])
  q = np.array([0.3, 0.1, 0.3, 0.1, 0.2])
  k_draft, k_accept = jax.random.split(jax.random.key(7))
  drafts = jax.random.categorical(k_draft, jnp.log(jnp.asarray(q)), shape=(rows,))[:, None]
  p_b = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (rows, 1, v))
  q_b = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (rows, 1, v))
  n, resample = jax.jit(mtp.speculative_accepts)(p_b, q_b, drafts.astype(jnp.int32), k_accept)
  emitted = np.where(np.asarray(n) == 1, np.asarray(drafts[:, 0]), np.asarray(resample))
  freq = np.bincount(emitted, minlength=v) / rows
  assert np.abs(freq - p).max() < 0.005, freq  # ~5 standard errors at 200k samples
  accept_rate = float(np.mean(np.asarray(n)))
  assert accept_rate == pytest.approx(np.minimum(p, q).sum(), abs=0.005)


def test_draft_acceptance_against_a_numpy_count():
  rng = np.random.default_rng(3)
  n, b, t = 4, 3, 9
  preds = rng.integers(0, 3, (n, b, t))  # few classes: many matches
  weights = np.ones((b, t), np.float32)
  weights[1, 6:] = 0  # padding
  _, w = mtp.shift_targets(jnp.zeros((b, t), jnp.int32), jnp.asarray(weights), n)
  accept, expected = mtp.draft_acceptance(jnp.asarray(preds), w)
  for k in range(1, n):
    hits = [preds[k, r, s] == preds[0, r, s + k] for r in range(b) for s in range(t - k)
            if weights[r, s + k]]
    np.testing.assert_allclose(accept[k - 1], np.mean(hits), rtol=1e-6)
  chains = []
  for r in range(b):
    for s in range(t - n + 1):
      if weights[r, s + n - 1]:
        length = 1
        for k in range(1, n):
          if preds[k, r, s] != preds[0, r, s + k]:
            break
          length += 1
        chains.append(length)
  np.testing.assert_allclose(expected, np.mean(chains), rtol=1e-6)


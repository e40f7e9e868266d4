"""RoPE (arXiv 2104.09864) against a naive numpy rotation, and its relative-position property;
the rotation, the default positions (numpy tables) and the dtype eagerly and under jit (chex
variants); the chex shape contract."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxtricks.ops.rope import apply_rope


def naive_rope(x, positions, base=10_000.0):
  """Rotates each pair (x_i, x_{i+H/2}) by positions * base^(-2i/H), one scalar at a time."""
  x = np.asarray(x, np.float64)
  b, t, n, h = x.shape
  out = np.empty_like(x)
  for bi in range(b):
    for ti in range(t):
      for ni in range(n):
        for i in range(h // 2):
          angle = positions[bi, ti] * base ** (-2.0 * i / h)
          c, s = np.cos(angle), np.sin(angle)
          x1, x2 = x[bi, ti, ni, i], x[bi, ti, ni, i + h // 2]
          out[bi, ti, ni, i] = x1 * c - x2 * s
          out[bi, ti, ni, i + h // 2] = x2 * c + x1 * s
  return out


class RopeVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(10_000.0, 500.0)
  def test_matches_naive_rotation(self, base):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    # Arbitrary, non-contiguous positions, different per row (as with a KV cache).
    positions = np.array([[0, 1, 2, 3, 4], [7, 3, 50, 11, 0]], np.int32)
    got = self.variant(apply_rope, static_argnums=2)(jnp.asarray(x), jnp.asarray(positions),
                                                      base)
    chex.assert_trees_all_close(got, naive_rope(x, positions, base), rtol=1e-5, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_position_zero_is_identity_and_norm_is_kept(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 2, 16)).astype(np.float32)
    positions = np.array([[0, 5, 17, 1000]])
    got = np.asarray(self.variant(apply_rope)(jnp.asarray(x), jnp.asarray(positions)))
    chex.assert_trees_all_equal(got[:, 0], x[:, 0])
    chex.assert_trees_all_close(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1),
                                rtol=1e-5)
    assert not np.allclose(got[:, 1:], x[:, 1:])

  @chex.variants(with_jit=True, without_jit=True)
  def test_default_positions_are_0_to_t_for_every_row(self):
    """positions None (numpy tables, constants under jit) equals explicit 0..T-1 positions, one
    row broadcast over the batch or one per row."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 2, 8)), jnp.float32)
    rope = self.variant(apply_rope)
    default = rope(x, None)
    chex.assert_trees_all_close(default, rope(x, jnp.arange(6)[None]), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(default, rope(x, jnp.tile(jnp.arange(6), (2, 1))), rtol=1e-6,
                                atol=1e-6)
    chex.assert_trees_all_close(default, naive_rope(x, np.tile(np.arange(6), (2, 1))),
                                rtol=1e-5, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_keeps_dtype_and_rejects_odd_head_dim(self):
    rope = self.variant(apply_rope)
    x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    chex.assert_type(rope(x, jnp.zeros((1, 3), jnp.int32)), jnp.bfloat16)
    with pytest.raises(ValueError, match="even"):
      rope(jnp.ones((1, 3, 2, 7)), jnp.zeros((1, 3), jnp.int32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_shape_contracts_are_checked_while_tracing(self):
    rope = self.variant(apply_rope)
    with pytest.raises(AssertionError, match=r"\[apply_rope: x_BxTxNxH\]"):
      rope(jnp.ones((3, 2, 8)), None)
    with pytest.raises(AssertionError, match=r"\[apply_rope: positions_BxT\]"):
      rope(jnp.ones((2, 3, 2, 8)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(AssertionError, match=r"\[apply_rope: positions_BxT\]"):
      rope(jnp.ones((2, 3, 2, 8)), jnp.zeros((3, 3), jnp.int32))


def test_dot_product_depends_only_on_relative_position():
  rng = np.random.default_rng(2)
  h = 32
  q = rng.normal(size=(h,)).astype(np.float32)
  k = rng.normal(size=(h,)).astype(np.float32)

  def score(p, s):
    xs = jnp.asarray(np.stack([q, k])[None, :, None, :])  # (1, 2, 1, H): q at p, k at s
    rotated = np.asarray(apply_rope(xs, jnp.asarray([[p, s]])), np.float64)
    return float(rotated[0, 0, 0] @ rotated[0, 1, 0])

  for offset in (0, 1, 5, 12):
    reference = score(offset, 0)
    for shift in (3, 40, 97):
      assert score(offset + shift, shift) == pytest.approx(reference, rel=1e-4, abs=1e-4)
  # ...and does depend on it (the property above is not vacuous).
  assert abs(score(5, 0) - score(1, 0)) > 1e-2


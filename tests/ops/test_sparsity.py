"""N:M masks, the double-pruned and SR-STE linears and compressed storage against numpy; the
chex shape contracts. The custom-VJP linears, the mask checks and the compressed round trip run
eagerly and under jit (chex variants)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtricks.ops import sparsity

NM = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8)]


def np_nm_mask(w, n, m, axis):
  """Reference: keep the n largest |w| of each group (stable: earlier entry wins a tie)."""
  moved = np.moveaxis(np.abs(w), axis, -1)
  groups = moved.reshape(*moved.shape[:-1], -1, m)
  order = np.argsort(-groups, axis=-1, kind="stable")
  keep = np.zeros_like(groups, dtype=bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  return np.moveaxis(keep.reshape(moved.shape), -1, axis)


_nm_mask = jax.jit(sparsity.nm_mask, static_argnums=(1, 2, 3))


@settings(max_examples=60, deadline=None)
@given(nm=st.sampled_from(NM), axis=st.integers(0, 1), ties=st.booleans(),
       seed=st.integers(0, 2**16))
def test_nm_mask_properties(nm, axis, ties, seed):
  n, m = nm
  rng = np.random.default_rng(seed)
  shape = (24, 3) if axis == 0 else (3, 24)  # one shape per axis: few compilations
  w = rng.standard_normal(shape).astype(np.float32)
  if ties:  # few distinct magnitudes, both signs
    w = np.round(w) * 0.5
  mask = np.asarray(_nm_mask(jnp.asarray(w), n, m, axis))
  chex.assert_trees_all_equal(mask, np_nm_mask(w, n, m, axis))
  grouped = np.moveaxis(mask, axis, -1).reshape(-1, m)
  assert (grouped.sum(-1) == n).all()  # every group keeps exactly n
  a = np.moveaxis(np.abs(w), axis, -1).reshape(-1, m)
  kept_min = np.where(grouped, a, np.inf).min(-1)
  dropped_max = np.where(grouped, -np.inf, a).max(-1)
  assert (kept_min >= dropped_max).all()  # no dropped entry is larger than a kept one


def test_expected_extra_zeros_formula():
  assert sparsity.expected_extra_zeros(2, 4) == pytest.approx(0.09375)
  assert sparsity.expected_extra_zeros(1, 2) == pytest.approx(0.125)
  assert sparsity.expected_extra_zeros(4, 4) == 0.0


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (2, 8)])
def test_double_pruning_extra_zeros_on_random_weights(n, m):
  rng = np.random.default_rng(n * 10 + m)
  w = rng.standard_normal((512, 512)).astype(np.float32)
  row = sparsity.nm_mask(jnp.asarray(w), n, m, axis=0)
  before = int(row.sum())
  after = int(jnp.count_nonzero(sparsity.double_prune(jnp.asarray(w), row, n, m)))
  measured = (before - after) / w.size
  expected = sparsity.expected_extra_zeros(n, m)
  # per-group removals are independent: binomial-like standard error over 512*512/m groups
  assert abs(measured - expected) < 5 * math.sqrt(expected / w.size * m), (measured, expected)


def np_double_pruned(w, row, n, m):
  w_r = np.where(row, w, 0)
  return np.where(np_nm_mask(w_r, n, m, axis=1), w_r, 0)


def _slope_vjp(x, w, dy, row, n, m, scale, double):
  """y and (dx, dw) of the double-pruned linear (or of the exact ablation, double=False)."""
  f = lambda x, w: sparsity.slope_matmul(x, w, row, n, m, scale, "masked_dense", double)  # noqa: E731
  y, vjp = jax.vjp(f, x, w)
  return y, *vjp(dy)


def _srste_vjp(x, w, dy, n, m, decay):
  y, vjp = jax.vjp(lambda x, w: sparsity.srste_matmul(x, w, n, m, decay), x, w)
  return y, *vjp(dy)


class SparsityVariantsTest(chex.TestCase):
  """Eager and jitted: the custom VJPs, mask checks and the compressed format's reshapes."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_nm_mask_errors(self):
    nm_mask = self.variant(sparsity.nm_mask, static_argnums=(1, 2, 3))
    with pytest.raises(ValueError, match="0 < n <= m"):
      nm_mask(jnp.ones((8, 2)), 5, 4, 0)
    with pytest.raises(ValueError, match="not divisible"):
      nm_mask(jnp.ones((6, 2)), 2, 4, 0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_slope_matmul_forward_and_gradients(self, rescale):
    n, m = 2, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    dy = rng.standard_normal((5, 8)).astype(np.float32)
    row = np_nm_mask(w, n, m, 0)
    scale = m / n if rescale else 1.0
    slope = self.variant(_slope_vjp, static_argnums=(4, 5, 6, 7))
    y, dx, dw = slope(x, w, dy, row, n, m, scale, True)
    chex.assert_trees_all_close(y, x @ np.where(row, w, 0) * scale, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dw, (x.T @ dy) * row * scale, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dx, dy @ np_double_pruned(w, row, n, m).T * scale, rtol=1e-5,
                                atol=1e-5)
    # the input gradient differs from the exact one: double pruning drops some of W^R
    exact = dy @ np.where(row, w, 0).T * scale
    assert not np.allclose(dx, exact)
    # ... which the ablation (double=False) computes, with the same weight gradient
    _, dx_exact, dw_exact = slope(x, w, dy, row, n, m, scale, False)
    chex.assert_trees_all_close(dx_exact, exact, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dw_exact, dw, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_srste_matmul_forward_and_gradients(self):
    n, m, decay = 2, 4, 0.1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    dy = rng.standard_normal((6, 4)).astype(np.float32)
    mask = np_nm_mask(w, n, m, 0)
    y, dx, dw = self.variant(_srste_vjp, static_argnums=(3, 4, 5))(x, w, dy, n, m, decay)
    chex.assert_trees_all_close(y, x @ (w * mask), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dx, dy @ (w * mask).T, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dw, x.T @ dy + decay * (1 - mask) * w, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((16, 6), 2, 4, 0), ((3, 8, 5), 1, 2, 1), ((4, 16), 2, 8, 1),
                            ((8, 2, 3), 3, 4, 0))
  def test_compress_round_trip(self, shape, n, m, axis):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    mask = sparsity.nm_mask(w, n, m, axis)
    c = self.variant(sparsity.compress_nm, static_argnums=(1, 2, 3))(w, n, m, axis)
    expected_shape = list(shape)
    expected_shape[axis] = shape[axis] * n // m
    chex.assert_shape(c.values, tuple(expected_shape))
    chex.assert_type(c.packed, jnp.uint8)
    chex.assert_trees_all_equal(self.variant(sparsity.decompress_nm)(c), jnp.where(mask, w, 0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_shape_contracts_are_checked_while_tracing(self):
    x, w = jnp.ones((3, 8)), jnp.ones((8, 4))
    row = jnp.ones((8, 4), bool)
    slope = self.variant(sparsity.slope_matmul, static_argnums=(3, 4))
    with pytest.raises(AssertionError, match=r"\[slope_matmul: x_RxI\]"):
      slope(x[:, :4], w, row, 2, 4)
    with pytest.raises(AssertionError, match=r"\[slope_matmul: masks\]"):
      slope(x, w, row[:4], 2, 4)
    with pytest.raises(AssertionError, match=r"\[srste_matmul: x_RxI, w_IxO\]"):
      self.variant(sparsity.srste_matmul, static_argnums=(2, 3))(x, w[None], 2, 4)
    with pytest.raises(AssertionError, match=r"\[double_prune: row_mask_IxO\]"):
      self.variant(sparsity.double_prune, static_argnums=(2, 3))(w, row.T, 2, 4)
    pos = jnp.zeros((2, 4, 2), jnp.int32)  # (G, O, n) in place of (O, G, n)
    with pytest.raises(AssertionError, match=r"\[gather_kept: pos_GxN\]"):
      self.variant(sparsity.gather_kept, static_argnums=(2, 3))(w, pos, 4, 0)
    with pytest.raises(AssertionError, match=r"\[scatter_kept: pos_GxN\]"):
      self.variant(sparsity.scatter_kept, static_argnums=(2, 3, 4))(w[:4], pos, 2, 4, 0)


def test_backend_seam_is_used_forward_and_backward():
  calls = []

  def counting(a, b, n, m):
    calls.append((a.shape, b.shape))
    return a @ b

  sparsity.SPARSE_MATMULS["counting"] = counting
  try:
    x, w = jnp.ones((3, 8)), jnp.arange(32.0).reshape(8, 4)
    row = sparsity.nm_mask(w, 2, 4, 0)
    jax.grad(lambda x: sparsity.slope_matmul(x, w, row, 2, 4, 1.0, "counting").sum())(x)
  finally:
    del sparsity.SPARSE_MATMULS["counting"]
  assert calls == [((3, 8), (8, 4)), ((3, 4), (4, 8))]


def test_compressed_bytes_for_2_4_float32():
  w = jnp.asarray(np.random.default_rng(3).standard_normal((256, 128)).astype(np.float32))
  c = sparsity.compress_nm(w, 2, 4, 0)
  # half the values plus 2 bits per kept value: 0.5 + 1/32 of dense float32
  assert c.nbytes / w.nbytes == pytest.approx(0.5 + 1 / 32)
  assert c.nbytes / w.nbytes <= 0.57


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4]), count=st.sampled_from([1, 7, 40]),
       seed=st.integers(0, 99))
def test_pack_bits_round_trip(bits, count, seed):
  idx = np.random.default_rng(seed).integers(0, 2 ** bits, count)
  packed = sparsity.pack_bits(jnp.asarray(idx), bits)
  chex.assert_trees_all_equal(sparsity.unpack_bits(packed, bits, count), idx)

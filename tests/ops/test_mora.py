"""MoRA operators (arXiv 2405.12130) against naive numpy loops over indices, for ragged and
divisible shapes; the explicit merge matrix (and its block-diagonal form for decoupling and
rotation); r_hat against hand values; dtypes; bad config and the chex shape contracts."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.ops import mora

# (d_in, d_out, r_hat): r_hat dividing d_in or not, d_out above and below d_in, r_hat > d_in
# (the wrap then cycles through x more than once), r_hat > d_out (the output is cut).
SHAPES = [(12, 20, 4), (10, 6, 4), (16, 16, 4), (9, 30, 6), (8, 3, 4), (3, 5, 8)]
CASES = [(op, *shape) for op in mora.OPERATORS for shape in SHAPES
         if not (op == "truncation" and shape[2] > shape[0])]


def naive_delta(x, m, d_out, operator):
  """f_decomp(f_comp(x) M) one index at a time, float64."""
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  rows, d_in = x.shape
  h = m.shape[0]
  out = np.zeros((rows, d_out))
  if operator == "truncation":
    kept = np.zeros((rows, h))
    for r in range(rows):
      for j in range(h):
        kept[r, j] = x[r, j]
    y = kept @ m
    for r in range(rows):
      for o in range(min(h, d_out)):
        out[r, o] = y[r, o]
    return out
  k = math.ceil(d_in / h)
  chunks = np.zeros((rows, k, h))
  for r in range(rows):
    for c in range(k):
      for j in range(h):
        chunks[r, c, j] = x[r, (c * h + j) % d_in]  # wrapped padding
  if operator == "sharing":
    summed = np.zeros((rows, h))
    for r in range(rows):
      for c in range(k):
        for j in range(h):
          summed[r, j] += chunks[r, c, j]
    y = summed @ m
    for r in range(rows):
      for o in range(d_out):
        out[r, o] = y[r, o % h]
    return out
  if operator == "rotation":
    rotated = np.zeros_like(chunks)
    for r in range(rows):
      for c in range(k):
        for j in range(h // 2):  # rotate the pair (j, j + h/2) by c * 10000^(-2j/h)
          angle = c * 10_000.0 ** (-2.0 * j / h)
          a, b = chunks[r, c, j], chunks[r, c, j + h // 2]
          rotated[r, c, j] = a * np.cos(angle) - b * np.sin(angle)
          rotated[r, c, j + h // 2] = b * np.cos(angle) + a * np.sin(angle)
    chunks = rotated
  flat = np.zeros((rows, k * h))
  for r in range(rows):
    for c in range(k):
      flat[r, c * h:(c + 1) * h] = chunks[r, c] @ m
  for r in range(rows):
    for o in range(d_out):
      out[r, o] = flat[r, o % (k * h)]
  return out


_delta_weight = jax.jit(mora.mora_delta_weight, static_argnums=(1, 2, 3))


def _inputs(d_in, r_hat, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, d_in)).astype(np.float32)
  m = rng.standard_normal((r_hat, r_hat)).astype(np.float32)
  return x, m


@pytest.mark.parametrize("operator,d_in,d_out,r_hat", CASES)
def test_delta_and_merge_weight_match_naive(operator, d_in, d_out, r_hat):
  x, m = _inputs(d_in, r_hat)

  @jax.jit  # one compile per case instead of one per eager op
  def delta_and_merged(x_RxI, m_HxH):
    dw_IxO = mora.mora_delta_weight(m_HxH, d_in, d_out, operator)
    chex.assert_shape(dw_IxO, (d_in, d_out))
    return mora.mora_delta(x_RxI, m_HxH, d_out, operator), x_RxI @ dw_IxO

  got, merged = delta_and_merged(x, m)
  chex.assert_shape(got, (3, d_out))
  chex.assert_trees_all_close(np.asarray(got, np.float64), naive_delta(x, m, d_out, operator),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(merged, got, atol=1e-5, rtol=1e-5)


def test_wrap_padding_is_not_zero_padding():
  # d_in = 10, r_hat = 4: the last chunk is (x8, x9, x0, x1), so x0 is counted twice.
  x = np.zeros((1, 10), np.float32)
  x[0, 0] = 1.0
  chunks = np.asarray(jax.jit(mora.compress, static_argnums=(1, 2))(x, 4, "decoupling"))
  want = np.zeros((1, 3, 4), np.float32)
  want[0, 0, 0] = want[0, 2, 2] = 1.0
  chex.assert_trees_all_equal(chunks, want)
  got = jax.jit(mora.mora_delta, static_argnums=(2, 3))(x, np.eye(4, dtype=np.float32), 4,
                                                        "sharing")
  chex.assert_trees_all_equal(np.asarray(got), np.array([[1.0, 0.0, 1.0, 0.0]], np.float32))


def test_block_diagonal_forms():
  """dW = diag(M, ..., M) for decoupling and diag(R_0 M, ..., R_3 M) for rotation (16 = 4 x 4)."""
  _, m = _inputs(16, 4)
  m = m.astype(np.float64)
  decoupled = _delta_weight(m.astype(np.float32), 16, 16, "decoupling")
  chex.assert_trees_all_close(np.asarray(decoupled, np.float64), np.kron(np.eye(4), m),
                              atol=1e-6)
  want = np.zeros((16, 16))
  for c in range(4):
    rot = np.zeros((4, 4))  # row-vector convention: v -> v @ rot
    for j in range(2):
      angle = c * 10_000.0 ** (-2.0 * j / 4)
      rot[j, j] = rot[j + 2, j + 2] = np.cos(angle)
      rot[j, j + 2], rot[j + 2, j] = np.sin(angle), -np.sin(angle)
    want[4 * c:4 * c + 4, 4 * c:4 * c + 4] = rot @ m
  rotated = _delta_weight(m.astype(np.float32), 16, 16, "rotation")
  chex.assert_trees_all_close(np.asarray(rotated, np.float64), want, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("operator", mora.OPERATORS)
def test_dtype_preserved(operator, dtype):
  x = jax.ShapeDtypeStruct((3, 10), dtype)  # eval_shape: traced, not compiled
  m = jax.ShapeDtypeStruct((4, 4), dtype)
  assert jax.eval_shape(lambda x: mora.compress(x, 4, operator), x).dtype == dtype
  assert jax.eval_shape(lambda x, m: mora.mora_delta(x, m, 6, operator), x, m).dtype == dtype
  assert jax.eval_shape(lambda m: mora.mora_delta_weight(m, 10, 6, operator), m).dtype == dtype


@pytest.mark.parametrize("d_in,d_out,rank,operator,want", [
    (128, 128, 8, "sharing", 45),
    (128, 128, 8, "rotation", 44),
    (128, 128, 8, "decoupling", 45),
    (4096, 4096, 8, "sharing", 256),
    (4096, 4096, 8, "rotation", 256),
    (4096, 11008, 8, "sharing", 347),
    (4096, 4096, 256, "sharing", 1448),
    (16, 8, 8, "truncation", 8),  # floor(sqrt(192)) = 13, capped at min(d_in, d_out)
    (16, 8, 8, "sharing", 13),
])
def test_mora_rank(d_in, d_out, rank, operator, want):
  got = mora.mora_rank(d_in, d_out, rank, operator)
  assert got == want
  assert got * got <= (d_in + d_out) * rank


def test_default_operator():
  assert [mora.default_operator(r) for r in (1, 8, 127, 128, 256)] == [
      "rotation", "rotation", "rotation", "sharing", "sharing"]


@pytest.mark.parametrize("call", [
    lambda: mora.mora_rank(16, 16, 0, "sharing"),
    lambda: mora.mora_rank(16, 16, -1, "rotation"),
    lambda: mora.mora_rank(16, 16, 8, "butterfly"),
    lambda: mora.mora_rank(0, 16, 8, "sharing"),
    lambda: mora.mora_rank(1, 1, 1, "rotation"),  # floor(sqrt(2)) = 1 rounds down to 0
    lambda: mora.default_operator(0),
    lambda: mora.compress(np.ones((2, 8)), 4, "butterfly"),
    lambda: mora.compress(np.ones((2, 8)), 5, "rotation"),  # odd r_hat
    lambda: mora.compress(np.ones((2, 8)), 9, "truncation"),  # r_hat > d_in
    lambda: mora.compress(np.ones((2, 8)), 0, "sharing"),
    lambda: mora.decompress(np.ones((2, 4)), 8, "butterfly"),
    lambda: mora.decompress(np.ones((2, 4)), 0, "sharing"),
])
def test_bad_config_raises_value_error(call):
  with pytest.raises(ValueError):
    call()


@pytest.mark.parametrize("call", [
    lambda: mora.compress(np.ones((2, 3, 8)), 4, "sharing"),
    lambda: mora.mora_delta(np.ones((2, 8)), np.ones((4, 5)), 8, "sharing"),
    lambda: mora.mora_delta(np.ones((2, 8)), np.ones((4,)), 8, "sharing"),
    lambda: mora.decompress(np.ones((2, 4)), 8, "rotation"),
    lambda: mora.decompress(np.ones((2, 2, 4)), 8, "sharing"),
])
def test_shape_contracts(call):
  with pytest.raises(AssertionError):
    call()

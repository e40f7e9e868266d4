"""HyperAttention (jaxtricks.ops.hyper_attention; Han et al. 2023, arXiv 2310.05869): one block
per segment is exact attention (float64 numpy reference with explicit masks, through the causal
recursion, grouped heads), the error against exact attention falls as more key columns are
sampled, the Gray-code bucket order, determinism in the seed, causality of the gradients, jit,
and the refused configs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.errors import ConfigError
from jaxtricks.ops.hyper_attention import gray_rank, hyper_attention

hyper_jit = jax.jit(hyper_attention, static_argnames=("block_size", "samples", "min_seq_len",
                                                      "causal", "lsh_bits"))


def numpy_attention(q, k, v, causal):
  """softmax(q k^T / sqrt(H) + mask) v per batch row and query head (head n reads K/V head
  n // G), float64, the causal mask written out as j <= i."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  mask = np.array([[j <= i or not causal for j in range(t)] for i in range(t)])
  out = np.zeros_like(q)
  for bi in range(b):
    for ni in range(n):
      logits = np.where(mask, q[bi, :, ni] @ k[bi, :, ni // g].T / np.sqrt(h), -np.inf)
      p = np.exp(logits - logits.max(axis=-1, keepdims=True))
      out[bi, :, ni] = (p / p.sum(axis=-1, keepdims=True)) @ v[bi, :, ni // g]
  return out


def make_qkv(seed, t, n=2, k=2, h=16, b=2, v_mean=0.0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, t, k, h)) + v_mean, jnp.float32))


def relative_error(out, exact):
  return float(np.linalg.norm(np.asarray(out) - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("samples", [0, 32])
def test_one_block_is_exact_attention(causal, samples):
  """block_size = T: every segment of the recursion (64 -> 32 -> 16 -> 8) and every lower-left
  quarter is one block, attended exactly; samples all fall in the one block and are masked."""
  q, k, v = make_qkv(0, 64, n=4, k=2)
  out = hyper_jit(q, k, v, block_size=64, samples=samples, min_seq_len=8, causal=causal)
  chex.assert_shape(out, q.shape)
  chex.assert_trees_all_close(out, numpy_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_at_or_below_min_seq_len_causal_is_exact():
  q, k, v = make_qkv(1, 48, n=2, k=1)
  out = hyper_attention(q, k, v, block_size=8, samples=8, min_seq_len=48)
  chex.assert_trees_all_close(out, numpy_attention(q, k, v, True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_error_falls_as_more_columns_are_sampled(causal):
  """Relative Frobenius error against exact attention, mean over 4 seeds, for 0, 64 and T
  sampled columns (T = 256, blocks of 16, recursion down to 32)."""
  q, k, v = make_qkv(2, 256, b=1, v_mean=1.0)
  exact = numpy_attention(q, k, v, causal)
  errors = [np.mean([relative_error(hyper_jit(q, k, v, block_size=16, samples=m, seed=s,
                                              min_seq_len=32, causal=causal), exact)
                     for s in range(4)]) for m in (0, 64, 256)]
  assert errors[0] > 1.3 * errors[1] > 1.3 * 1.3 * errors[2], errors


def test_sorted_queries_meet_their_own_keys():
  """k = q, sharp enough that exact attention is nearly v (each query's weight on its own key):
  queries and keys sort identically, so each own key lies in its query's block, and blocks of 8
  of 128 keys without samples reproduce it (a query whose own key fell outside its block would
  output a mix of other values, error about 1)."""
  q, _, v = make_qkv(3, 128, h=32)
  q = 2.0 * q
  out = hyper_jit(q, q, v, block_size=8, samples=0, causal=False)
  exact = numpy_attention(q, q, v, False)
  assert relative_error(exact, np.asarray(v)) < 0.1
  assert relative_error(out, exact) < 0.1


def test_gray_rank_orders_buckets_one_bit_apart():
  order = np.argsort(np.asarray(gray_rank(jnp.arange(128), 7)))
  np.testing.assert_array_equal(np.sort(order), np.arange(128))
  assert all(bin(int(a) ^ int(b)).count("1") == 1 for a, b in zip(order[:-1], order[1:],
                                                                   strict=True))


def test_deterministic_in_the_seed_and_jittable():
  q, k, v = make_qkv(4, 64)
  kw = dict(block_size=8, samples=16, min_seq_len=16)
  f = jax.jit(lambda q, k, v, seed: hyper_attention(q, k, v, seed=seed, **kw))
  a, b, c = f(q, k, v, 0), f(q, k, v, 0), f(q, k, v, 1)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(np.asarray(a), np.asarray(c))
  q, k, v = (x[:1, :32] for x in (q, k, v))  # eager (op by op) on a smaller input
  chex.assert_trees_all_close(hyper_attention(q, k, v, seed=1, **kw), f(q, k, v, 1), rtol=1e-6,
                              atol=1e-6)


def test_gradients_are_causal():
  """d out[t] / d (q, k, v)[t'] is exactly zero for every t' > t and not for t' = t (but for q and
  k at t = 0), through the recursion (64 -> 32 -> 16), sorted blocks and samples."""
  q, k, v = make_qkv(5, 64, n=2, k=1, b=1)
  c = jnp.asarray(np.random.default_rng(6).normal(size=q.shape), jnp.float32)

  @jax.jit
  def row_grads(q, k, v, t):
    f = lambda q, k, v: jnp.sum(  # noqa: E731
        hyper_attention(q, k, v, block_size=8, samples=16, min_seq_len=16)[:, t] * c[:, t])
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  for t in (0, 15, 16, 40, 63):
    dq, dk, dv = row_grads(q, k, v, t)
    for g in (dq, dk, dv):
      np.testing.assert_array_equal(np.asarray(g[:, t + 1:]), 0.0)
    assert np.abs(np.asarray(dv[:, t])).max() > 0
    if t == 0:  # one visible key: the softmax is constant, so q and k get no gradient
      np.testing.assert_allclose(np.asarray(dq[:, 0]), 0.0, atol=1e-6)
      np.testing.assert_allclose(np.asarray(dk[:, 0]), 0.0, atol=1e-6)
    else:
      assert np.abs(np.asarray(dq[:, t])).max() > 0
      assert np.abs(np.asarray(dk[:, t])).max() > 0


@pytest.mark.parametrize("t,kwargs,match", [
    (4096, dict(block_size=300), "block_size=300 does not divide the sequence length 4096"),
    (64, dict(block_size=12, min_seq_len=64), "block_size=12 does not divide the sequence"),
    (96, dict(block_size=16, min_seq_len=16), "block_size=16 does not divide the segment "
     "length 24"),
    (96, dict(block_size=2, min_seq_len=2), "segment length 3 is odd"),
    (64, dict(samples=-1), "samples=-1"),
    (64, dict(block_size=0), "block_size=0"),
    (64, dict(lsh_bits=0), "lsh_bits=0"),
])
def test_bad_config_is_refused(t, kwargs, match):
  x = jnp.zeros((1, t, 1, 4))
  with pytest.raises(ConfigError, match=match):
    hyper_attention(x, x, x, **kwargs)

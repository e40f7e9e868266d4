"""Blockwise exact attention (jaxtricks.ops.blockwise_attention; arXiv 2112.05682, 2205.14135)
against a float64 numpy attention with explicit masks (causal, sliding window, strict, non-causal,
grouped heads, lengths that are not multiples of the blocks), its log-sum-exp, its custom VJP
against autodiff of a plain jnp attention, the skipping of fully masked blocks in the forward and
the backward (NaN-poisoned keys that a skipped block would read), config errors and the memory
of the compiled forward and backward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.errors import ConfigError
from jaxtricks.ops.blockwise_attention import blockwise_attention, blockwise_attention_with_lse


def allowed(t, s, causal, window=0, strict=False):
  """(T, S) boolean mask, one entry at a time."""
  mask = np.ones((t, s), bool)
  for i in range(t):
    for j in range(s):
      if causal:
        mask[i, j] = (j < i if strict else j <= i) and (window == 0 or i - j < window)
  return mask


def numpy_attention(q, k, v, mask):
  """Per batch row and query head (head n reads K/V head n // G), float64; a row with no
  allowed key outputs zeros. Returns (out, lse)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out, lse = np.zeros_like(q), np.full((b, t, n), -np.inf)
  for bi in range(b):
    for ni in range(n):
      logits = q[bi, :, ni] @ k[bi, :, ni // g].T / np.sqrt(h)
      for i in range(t):
        row = logits[i][mask[i]]
        if row.size:
          p = np.exp(row - row.max())
          out[bi, i, ni] = p @ v[bi, mask[i], ni // g] / p.sum()
          lse[bi, i, ni] = row.max() + np.log(p.sum())
  return out, lse


def jnp_attention(q, k, v, mask):
  """Plain differentiable jnp attention with an explicit mask (empty rows: zeros)."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  den = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("BNTS,BSNH->BTNH", p / jnp.where(den > 0, den, 1.0), v)
  lse = jnp.where(den > 0, jnp.log(jnp.where(den > 0, den, 1.0)) + m, -jnp.inf)[..., 0]
  return out, lse.transpose(0, 2, 1)


def make_qkv(seed, t, s=None, n=2, k=2, h=8, b=2):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  return (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, s, k, h)), jnp.float32))


# (T, S, N, K, causal, window, strict, block_q, block_k)
CASES = {
    "causal": (32, 32, 2, 2, True, 0, False, 8, 8),
    "causal_padded_blocks": (37, 37, 2, 2, True, 0, False, 8, 16),
    "window": (37, 37, 2, 2, True, 5, False, 8, 8),
    "window_wide_blocks": (32, 32, 2, 2, True, 11, False, 4, 16),
    "strict": (32, 32, 2, 2, True, 0, True, 8, 8),
    "strict_window": (29, 29, 2, 2, True, 3, True, 8, 4),
    "non_causal": (24, 40, 2, 2, False, 0, False, 8, 16),
    "non_causal_padded": (21, 27, 2, 2, False, 0, False, 8, 8),
    "gqa": (32, 32, 4, 2, True, 0, False, 8, 8),
    "mqa": (32, 32, 4, 1, True, 6, False, 16, 8),
    "one_block": (16, 16, 4, 2, True, 0, False, 512, 512),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_numpy_with_explicit_masks(case):
  t, s, n, kh, causal, window, strict, bq, bk = CASES[case]
  q, k, v = make_qkv(0, t, s, n, kh)
  out, lse = blockwise_attention_with_lse(q, k, v, causal=causal, window=window, strict=strict,
                                          block_q=bq, block_k=bk)
  ref, ref_lse = numpy_attention(q, k, v, allowed(t, s, causal, window, strict))
  chex.assert_shape(out, q.shape)
  chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
  if strict:  # the first query sees no key
    np.testing.assert_array_equal(np.asarray(out[:, 0]), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, 0])))


@pytest.mark.parametrize("case", ["causal_padded_blocks", "window", "strict_window",
                                  "non_causal_padded", "gqa", "mqa"])
def test_custom_vjp_matches_autodiff_of_the_plain_attention(case):
  """d/d(q, k, v) of <out, c> + <lse, c'>, the lse cotangent included (merges use it)."""
  t, s, n, kh, causal, window, strict, bq, bk = CASES[case]
  q, k, v = make_qkv(1, t, s, n, kh)
  rng = np.random.default_rng(2)
  c_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  c_lse = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  mask = jnp.asarray(allowed(t, s, causal, window, strict))

  def weighted(fn):
    def f(q, k, v):
      out, lse = fn(q, k, v)
      return jnp.sum(out * c_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * c_lse)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

  got = weighted(lambda q, k, v: blockwise_attention_with_lse(
      q, k, v, causal=causal, window=window, strict=strict, block_q=bq, block_k=bk))
  want = weighted(lambda q, k, v: jnp_attention(q, k, v, mask))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_jit_matches_eager():
  q, k, v = make_qkv(3, 32, n=4, k=2)
  f = lambda q, k, v: blockwise_attention(q, k, v, window=7, block_q=8, block_k=8)  # noqa: E731
  chex.assert_trees_all_close(jax.jit(f)(q, k, v), f(q, k, v), rtol=1e-6, atol=1e-6)


def test_fully_masked_blocks_are_skipped_forward_and_backward():
  """Values a skipped block would read are NaN; 0 * NaN would spread into the rows otherwise."""
  q, k, v = make_qkv(4, 32)
  future = jnp.arange(32)[None, :, None, None] >= 8
  k_nan, v_nan = jnp.where(future, jnp.nan, k), jnp.where(future, jnp.nan, v)
  f = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, block_q=8, block_k=8))
  ref, _ = numpy_attention(q[:, :8], k[:, :8], v[:, :8], allowed(8, 8, True))
  chex.assert_trees_all_close(f(q, k_nan, v_nan)[:, :8], ref, rtol=1e-5, atol=1e-5)
  c = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
  c = c * (jnp.arange(32)[None, :, None, None] < 8)
  dq = jax.grad(lambda q: jnp.sum(f(q, k_nan, v_nan) * c))(q)
  dq_ref = jax.grad(lambda q: jnp.sum(f(q, k, v) * c))(q)
  chex.assert_trees_all_close(dq[:, :8], dq_ref[:, :8], rtol=1e-6, atol=1e-6)
  # A window of 8: the last query block (24..31) never reads keys 0..15.
  past = jnp.arange(32)[None, :, None, None] < 16
  k_nan, v_nan = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
  w = lambda k, v: blockwise_attention(q, k, v, window=8, block_q=8, block_k=8)  # noqa: E731
  chex.assert_trees_all_close(w(k_nan, v_nan)[:, 24:], w(k, v)[:, 24:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(causal=False, window=4), "window=4 and strict=False need causal=True"),
    (dict(causal=False, strict=True), "need causal=True"),
    (dict(window=-1), "window=-1"),
    (dict(block_q=0), "block_q=0"),
    (dict(block_k=-2), "block_k=-2"),
])
def test_bad_config_is_refused(kwargs, match):
  q, k, v = make_qkv(0, 8)
  with pytest.raises(ConfigError, match=match):
    blockwise_attention(q, k, v, **kwargs)


def test_bad_shapes_are_refused():
  q, k, v = make_qkv(0, 8, 12)
  with pytest.raises(ConfigError, match="as many keys as queries"):
    blockwise_attention(q, k, v)
  q, k, v = make_qkv(0, 8, n=4, k=3)
  with pytest.raises(ConfigError, match="multiple"):
    blockwise_attention(q, k, v)


def test_memory_is_linear_in_the_sequence():
  """Temp bytes of the compiled forward and of the gradient stay under 1/8 of one T x T float32
  score matrix at T = 4096 (compiled only, not run)."""
  t = 4096
  x = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32)
  forward = jax.jit(blockwise_attention).lower(x, x, x).compile()
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v)),
                          argnums=(0, 1, 2))).lower(x, x, x).compile()
  for compiled in (forward, grad):
    assert compiled.memory_analysis().temp_size_in_bytes < t * t * 4 / 8

"""The attention computation (jaxtricks.ops.attention): grouped K/V heads (MHA / GQA / MQA, arXiv
2305.13245, 1911.02150) against a naive float64 numpy softmax attention, against explicitly
repeated K/V and against jax.nn.dot_product_attention; masks, the causal flag, decode-shaped
queries, the head-major cache layout, causality and the chex shape contracts. Tests whose result
can depend on tracing (Python control flow on shapes and flags) run eagerly and under jit
(chex variants). K/V layouts and cache bytes: tests/ops/test_kv_layout.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.ops.attention import attention, cached_attention, causal_mask

attention_jit = jax.jit(attention, static_argnames="implementation")
dpa_jit = jax.jit(jax.nn.dot_product_attention, static_argnames=("implementation", "is_causal"))
STATIC = ("implementation", "causal")


def naive_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(H)) v per batch row and query head; query head n reads K/V head
  n // (N / K). float64, explicit loops over rows and heads."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for ni in range(n):
      kk, vv = k[bi, :, ni // group], v[bi, :, ni // group]  # (S, H)
      logits = q[bi, :, ni] @ kk.T / np.sqrt(h)  # (T, S)
      if mask is not None:
        logits = np.where(mask[bi], logits, -np.inf)
      probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
      probs /= probs.sum(axis=-1, keepdims=True)
      out[bi, :, ni] = probs @ vv
  return out


def make_qkv(seed, b=2, t=5, s=5, n=4, k=2, h=8):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, t, n, h)).astype(np.float32),
          rng.normal(size=(b, s, k, h)).astype(np.float32),
          rng.normal(size=(b, s, k, h)).astype(np.float32))


def random_mask(seed, b, t, s):
  mask = np.random.default_rng(seed).random((b, t, s)) < 0.5
  mask[:, :, 0] = True  # every query sees at least one key
  return mask


HEADS = [(4, 4), (4, 2), (4, 1), (6, 3)]  # (N, K): MHA, GQA, MQA, GQA with groups of 2
TRIL = np.tril(np.ones((5, 5), bool))[None].repeat(2, 0)


def causal_inputs(n, k, t, s=9, seed=0):
  """q for the last t of s positions, k, v over all s, and their causal mask (B, t, s)."""
  q, kk, v = make_qkv(seed, t=t, s=s, n=n, k=k)
  q_pos = np.broadcast_to(np.arange(s - t, s), (2, t))
  k_pos = np.broadcast_to(np.arange(s), (2, s))
  return q, kk, v, np.asarray(causal_mask(jnp.asarray(q_pos), jnp.asarray(k_pos)))


class AttentionVariantsTest(chex.TestCase):
  """Eager and jitted: masks, the causal flag and the head grouping are decided while tracing."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_queries_and_keys_of_different_lengths(self):
    """T queries continuing a sequence of S keys (decoding with a cache), per-row offsets."""
    q, k, v = make_qkv(2, t=3, s=9)
    q_pos = np.array([[4, 5, 6], [6, 7, 8]])
    k_pos = np.broadcast_to(np.arange(9), (2, 9))
    mask = self.variant(causal_mask)(jnp.asarray(q_pos), jnp.asarray(k_pos))
    chex.assert_trees_all_equal(mask, q_pos[:, :, None] >= k_pos[:, None, :])
    got = self.variant(attention, static_argnames=STATIC)(jnp.asarray(q), jnp.asarray(k),
                                                           jnp.asarray(v), mask)
    chex.assert_trees_all_close(got, naive_attention(q, k, v, np.asarray(mask)), rtol=1e-5,
                                atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_causal_flag_equals_the_causal_mask(self):
    """causal=True (a static tril mask, or the backend's causal kernel), alone and combined
    with a mask, for the naive and the XLA implementation."""
    q, kk, v = (jnp.asarray(a) for a in make_qkv(7, n=4, k=2))
    mask = random_mask(8, 2, 5, 5)
    f = self.variant(attention, static_argnames=STATIC)
    for implementation in ("naive", "xla"):
      got = f(q, kk, v, implementation=implementation, causal=True)
      chex.assert_trees_all_close(got, naive_attention(q, kk, v, TRIL), rtol=1e-5, atol=1e-5)
      got = f(q, kk, v, jnp.asarray(mask), implementation=implementation, causal=True)
      chex.assert_trees_all_close(got, naive_attention(q, kk, v, mask & TRIL), rtol=1e-5,
                                  atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cached_attention_on_the_head_major_layout(self):
    """The decoding layout (B, K, S, H) gives the attention of (B, S, K, H) (groups of 2)."""
    q, kk, v, mask = causal_inputs(6, 3, t=3, seed=3)
    head_major = lambda a: jnp.asarray(a).transpose(0, 2, 1, 3)  # noqa: E731
    got = self.variant(cached_attention)(jnp.asarray(q), head_major(kk), head_major(v),
                                         jnp.asarray(mask))
    chex.assert_shape(got, q.shape)
    chex.assert_trees_all_close(got, naive_attention(q, kk, v, mask), rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bad_head_counts_and_implementation_are_refused(self):
    f = self.variant(attention, static_argnames=STATIC)
    q, k, v = (jnp.asarray(a) for a in make_qkv(0, n=4, k=3))
    with pytest.raises(ValueError, match="multiple"):
      f(q, k, v)
    with pytest.raises(ValueError, match="multiple"):
      self.variant(cached_attention)(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), None)
    q, k, v = (jnp.asarray(a) for a in make_qkv(0, n=4, k=2))
    with pytest.raises(ValueError, match="naive, xla, cudnn"):
      f(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="as many keys as queries"):
      f(q[:, :3], k, v, causal=True)

  @chex.variants(with_jit=True, without_jit=True)
  def test_shape_contracts_are_checked_while_tracing(self):
    f = self.variant(attention, static_argnames=STATIC)
    q, k, v = (jnp.asarray(a) for a in make_qkv(0, n=4, k=2))
    with pytest.raises(AssertionError, match=r"assert_rank failed.*\[attention: q, k, v\]"):
      f(q[0], k, v)
    with pytest.raises(AssertionError, match=r"\[attention: k and v\]"):
      f(q, k, v[:, :4])
    with pytest.raises(AssertionError, match=r"\[attention: batch, head dim\]"):
      f(q[:1], k, v)
    with pytest.raises(AssertionError, match=r"\[attention: batch, head dim\]"):
      f(q[..., :4], k, v)
    with pytest.raises(AssertionError, match=r"\[attention: mask_BxTxS\]"):
      f(q, k, v, jnp.ones((2, 5, 4), bool))
    with pytest.raises(AssertionError, match=r"\[cached_attention: k and v\]"):
      self.variant(cached_attention)(q, k.transpose(0, 2, 1, 3), v, None)
    with pytest.raises(AssertionError, match=r"\[causal_mask: batch\]"):
      self.variant(causal_mask)(jnp.zeros((2, 3)), jnp.zeros((1, 9)))
    # a mask of one row is broadcast over the batch
    mask = random_mask(5, 1, 5, 5)
    chex.assert_trees_all_close(f(q, k, v, jnp.asarray(mask)),
                                f(q, k, v, jnp.asarray(mask.repeat(2, 0))), rtol=0, atol=0)


@pytest.mark.parametrize("n,k", HEADS)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "random"])
def test_matches_naive_numpy(n, k, mask_kind):
  q, kk, v = make_qkv(0, n=n, k=k)
  mask = {"none": None, "causal": TRIL, "random": random_mask(1, 2, 5, 5)}[mask_kind]
  got = attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v),
                  None if mask is None else jnp.asarray(mask))
  chex.assert_shape(got, q.shape)
  chex.assert_trees_all_close(got, naive_attention(q, kk, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", HEADS)
def test_grouped_kv_equals_explicitly_repeated_kv(n, k):
  q, kk, v = make_qkv(3, n=n, k=k)
  mask = jnp.asarray(random_mask(4, 2, 5, 5))
  grouped = attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), mask)
  repeat = lambda a: jnp.repeat(jnp.asarray(a), n // k, axis=2)  # query head i -> K/V head i//G
  multi_head = attention(jnp.asarray(q), repeat(kk), repeat(v), mask)
  chex.assert_trees_all_close(grouped, multi_head, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,k", HEADS)
def test_matches_jax_dot_product_attention(n, k):
  q, kk, v = make_qkv(5, n=n, k=k)
  q, kk, v = jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v)
  mask = jnp.asarray(random_mask(6, 2, 5, 5))
  reference = jax.nn.dot_product_attention(q, kk, v, mask=mask[:, None])
  naive = attention(q, kk, v, mask)
  xla = attention(q, kk, v, mask, implementation="xla")
  chex.assert_trees_all_close(naive, reference, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(xla, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,k", HEADS)
@pytest.mark.parametrize("implementation", ["xla", None], ids=["xla", "default"])
def test_causal_attention_equals_dot_product_attention_is_causal(n, k, implementation):
  q, kk, v, mask = causal_inputs(n, k, t=9)
  ref = dpa_jit(q, kk, v, is_causal=True, implementation=implementation)
  chex.assert_trees_all_close(attention_jit(q, kk, v, mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", HEADS)
def test_decode_shaped_queries(n, k):
  """3 queries at the last positions against all cached keys (what a decode step computes)."""
  q, kk, v, mask = causal_inputs(n, k, t=3, seed=1)
  ref = naive_attention(q, kk, v, mask)
  for implementation in ("naive", "xla"):
    chex.assert_trees_all_close(attention_jit(q, kk, v, mask, implementation), ref, rtol=1e-5,
                                atol=1e-5)


def test_causal_mask_is_lower_triangular():
  *_, mask = causal_inputs(4, 2, t=9)
  chex.assert_trees_all_equal(mask, np.broadcast_to(np.tril(np.ones((9, 9), bool)), (2, 9, 9)))


def test_output_of_a_query_ignores_keys_after_it():
  q, k, v, mask = causal_inputs(4, 1, t=9, seed=2)
  k2, v2 = k.copy(), v.copy()
  k2[:, 5:] *= -3.0  # change keys and values at positions 5..8
  v2[:, 5:] += 100.0
  a = np.asarray(attention_jit(q, k, v, mask))
  b = np.asarray(attention_jit(q, k2, v2, mask))
  chex.assert_trees_all_equal(a[:, :5], b[:, :5])
  assert (np.abs(a[:, 5:] - b[:, 5:]).max(-1) > 1e-3).all()  # later queries do see them

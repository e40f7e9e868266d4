"""Attention with grouped K/V heads against a naive numpy softmax attention, against explicit K/V
repetition and against jax.nn.dot_product_attention; CLA layouts and KV-cache bytes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.models.transformer import ModelConfig
from jaxtricks.ops.attention import attention, causal_mask, kv_bytes_per_token, kv_sources


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


@pytest.mark.parametrize("n,k", HEADS)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "random"])
def test_matches_naive_numpy(n, k, mask_kind):
  q, kk, v = make_qkv(0, n=n, k=k)
  mask = {"none": None,
          "causal": np.tril(np.ones((5, 5), bool))[None].repeat(2, 0),
          "random": random_mask(1, 2, 5, 5)}[mask_kind]
  got = attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v),
                  None if mask is None else jnp.asarray(mask))
  assert got.shape == q.shape
  np.testing.assert_allclose(np.asarray(got), naive_attention(q, kk, v, mask), rtol=1e-5,
                             atol=1e-5)


def test_queries_and_keys_of_different_lengths():
  """T queries continuing a sequence of S keys (decoding with a cache), per-row offsets."""
  q, k, v = make_qkv(2, t=3, s=9)
  q_pos = np.array([[4, 5, 6], [6, 7, 8]])
  k_pos = np.broadcast_to(np.arange(9), (2, 9))
  mask = np.asarray(causal_mask(jnp.asarray(q_pos), jnp.asarray(k_pos)))
  np.testing.assert_array_equal(mask, q_pos[:, :, None] >= k_pos[:, None, :])
  got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, mask), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("n,k", HEADS)
def test_grouped_kv_equals_explicitly_repeated_kv(n, k):
  q, kk, v = make_qkv(3, n=n, k=k)
  mask = jnp.asarray(random_mask(4, 2, 5, 5))
  grouped = attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), mask)
  repeat = lambda a: jnp.repeat(jnp.asarray(a), n // k, axis=2)  # query head i -> K/V head i//G
  multi_head = attention(jnp.asarray(q), repeat(kk), repeat(v), mask)
  np.testing.assert_allclose(np.asarray(grouped), np.asarray(multi_head), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,k", HEADS)
def test_matches_jax_dot_product_attention(n, k):
  q, kk, v = make_qkv(5, n=n, k=k)
  q, kk, v = jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v)
  mask = jnp.asarray(random_mask(6, 2, 5, 5))
  reference = jax.nn.dot_product_attention(q, kk, v, mask=mask[:, None])
  naive = attention(q, kk, v, mask)
  xla = attention(q, kk, v, mask, implementation="xla")
  np.testing.assert_allclose(np.asarray(naive), np.asarray(reference), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(xla), np.asarray(reference), rtol=1e-6, atol=1e-6)


def test_bad_head_counts_and_implementation_are_refused():
  q, k, v = make_qkv(0, n=4, k=3)
  with pytest.raises(ValueError, match="multiple"):
    attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  q, k, v = make_qkv(0, n=4, k=2)
  with pytest.raises(ValueError, match="naive, xla, cudnn"):
    attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation="flash")


def test_kv_sources_cross_layer_sharing():
  assert kv_sources(4) == (0, 1, 2, 3)
  assert kv_sources(4, sharing=2) == (0, 0, 2, 2)
  assert kv_sources(5, sharing=2) == (0, 1, 1, 3, 3)  # the short group comes first
  cla3 = kv_sources(20, sharing=3)
  assert len(set(cla3)) == 7  # CLA3 on 20 layers: 7 producers, as in the paper
  assert all(cla3[src] == src and src <= i for i, src in enumerate(cla3))
  assert kv_sources(4, layout=(0, 0, 0, 3)) == (0, 0, 0, 3)
  with pytest.raises(ValueError):
    kv_sources(3, layout=(0, 2, 2))  # layer 1 cannot read a later layer
  with pytest.raises(ValueError):
    kv_sources(3, layout=(0, 0, 1))  # layer 1 does not produce K/V
  with pytest.raises(ValueError):
    kv_sources(3, sharing=4)


def test_kv_bytes_per_token():
  cfg = ModelConfig(d_model=64, n_layers=4, n_heads=8, n_kv_heads=2)
  assert kv_bytes_per_token(cfg) == 2 * 2 * 8 * 4 * 4  # K and V, 2 heads, H=8, 4 layers, fp32
  assert kv_bytes_per_token(dataclasses.replace(cfg, kv_sharing=2)) == 2 * 2 * 8 * 2 * 4
  assert kv_bytes_per_token(dataclasses.replace(cfg, dtype="bfloat16")) == 2 * 2 * 8 * 4 * 2
  assert kv_bytes_per_token(cfg, bytes_per_element=1) == 2 * 2 * 8 * 4

"""Causal simplified linear attention (jaxtricks.ops.linear_attention) against a naive quadratic
numpy form: o_t = sum_{j<=t} (phi(q_t).phi(k_j)) v_j / (sum_{j<=t} phi(q_t).phi(k_j) + eps),
phi = ReLU, grouped heads; the chunked form for every chunk size, a carried state, padding left
out of the state, and the depthwise causal convolution against numpy."""

import chex
import jax
import numpy as np
import pytest

from jaxtricks.ops.linear_attention import causal_conv, causal_linear_attention, conv_history

B, T, N, K, H = 2, 11, 4, 2, 8
EPS = 1e-6


def relu(x):
  return np.maximum(x, 0.0)


def naive(q, k, v, s0=None, z0=None, valid=None, eps=EPS):
  """Quadratic form in float64, the initial state added to every query's sums."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  fk = relu(k) if valid is None else relu(k) * valid[:, :, None, None]
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for i in range(t):
      for head in range(n):
        kv = head // g
        fq = relu(q[bi, i, head])
        w = fk[bi, :i + 1, kv] @ fq                       # (i+1,) scores
        num = w @ v[bi, :i + 1, kv]
        den = w.sum()
        if s0 is not None:
          num, den = num + fq @ s0[bi, kv], den + fq @ z0[bi, kv]
        out[bi, i, head] = num / (den + eps)
  s = np.einsum("btkh,btkv->bkhv", fk, v) + (0 if s0 is None else s0)
  z = fk.sum(1) + (0 if z0 is None else z0)
  return out, s, z


@pytest.fixture(scope="module")
def qkv():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((B, T, N, H)), rng.standard_normal((B, T, K, H)),
          rng.standard_normal((B, T, K, H)))


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_chunked_form_equals_the_quadratic_form(qkv, chunk):
  q, k, v = qkv
  ref, s_ref, z_ref = naive(q, k, v)
  out, (s, z) = causal_linear_attention(*(x.astype(np.float32) for x in qkv), chunk=chunk)
  chex.assert_shape(out, (B, T, N, H))
  chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close((s, z), (s_ref, z_ref), atol=1e-4, rtol=1e-5)


def test_carried_state_and_padding(qkv):
  """A state carried into the call adds to every query; keys marked invalid add nothing."""
  q, k, v = qkv
  rng = np.random.default_rng(1)
  s0 = np.abs(rng.standard_normal((B, K, H, H)))
  z0 = np.abs(rng.standard_normal((B, K, H))) + 1.0
  valid = np.arange(T)[None] < np.array([[7], [T]])
  ref, s_ref, z_ref = naive(q, k, v, s0, z0, valid)
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  out, (s, z) = causal_linear_attention(f32(q), f32(k), f32(v), (f32(s0), f32(z0)), valid,
                                        chunk=4)
  chex.assert_trees_all_close(out, ref, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close((s, z), (s_ref, z_ref), atol=1e-4, rtol=1e-5)


def test_two_calls_through_the_state_equal_one(qkv):
  f32 = [x.astype(np.float32) for x in qkv]
  whole, state = causal_linear_attention(*f32, chunk=4)
  first, mid = causal_linear_attention(*(x[:, :5] for x in f32), chunk=4)
  second, end = causal_linear_attention(*(x[:, 5:] for x in f32), state=mid, chunk=4)
  chex.assert_trees_all_close(np.concatenate([first, second], 1), whole, atol=1e-5)
  chex.assert_trees_all_close(end, state, atol=1e-4, rtol=1e-5)


def test_gradients_of_the_chunked_form_equal_those_of_one_chunk(qkv):
  f32 = [x.astype(np.float32) for x in qkv]
  loss = lambda c: lambda *a: (causal_linear_attention(*a, chunk=c)[0] ** 2).sum()  # noqa: E731
  grad = lambda c: jax.jit(jax.grad(loss(c), argnums=(0, 1, 2)))(*f32)  # noqa: E731
  chex.assert_trees_all_close(grad(3), grad(T), atol=1e-4, rtol=1e-4)


def test_causal_conv_against_numpy(qkv):
  _, _, v = qkv
  rng = np.random.default_rng(2)
  w = rng.standard_normal((4, H))
  hist = rng.standard_normal((B, 3, K, H))
  x = np.concatenate([hist, v], 1)
  ref = np.zeros_like(v)
  for t in range(T):
    for i in range(4):
      ref[:, t] += w[i] * x[:, t + 3 - i]
  got = causal_conv(v.astype(np.float32), w.astype(np.float32), hist.astype(np.float32))
  chex.assert_trees_all_close(got, ref, atol=1e-5)
  zero_hist = causal_conv(v.astype(np.float32), w.astype(np.float32))
  ref0 = causal_conv(v.astype(np.float32), w.astype(np.float32), np.zeros_like(hist, np.float32))
  chex.assert_trees_all_equal(zero_hist, ref0)


def test_conv_history_keeps_the_values_before_the_padding(qkv):
  _, _, v = qkv
  hist = np.zeros((B, 3, K, H), np.float32)
  got = conv_history(hist, v.astype(np.float32), np.array([2, T]))
  chex.assert_trees_all_close(got[0], np.concatenate([hist[0, 2:], v[0, :2]], 0), atol=0)
  chex.assert_trees_all_close(got[1], v[1, T - 3:], atol=1e-7)

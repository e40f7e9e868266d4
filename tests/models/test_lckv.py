"""Layer-Condensed KV (Wu & Tu 2024, arXiv 2405.10637): the sandwich layout, the cache of the
producing layers only, iterative training converging to the exact sequential computation, and
one-token decoding equal to it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import override
from jaxtricks.decode import cache_bytes, init_cache
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.lckv import LCKVAttention, lckv_sources
from jaxtricks.models.transformer import ModelConfig, Transformer

T = 10
LCKV = ModelConfig(vocab_size=64, d_model=32, n_layers=8,
                   attention=LCKVAttention(n_heads=4, n_kv_heads=1))


def test_sandwich_layout_and_its_cache():
  assert lckv_sources(8, 2) == (0, 6, 6, 6, 6, 6, 6, 7)  # as the paper's "0_20_..._20_21"
  assert lckv_sources(8, 0) == (7,) * 8
  assert lckv_sources(8, 3) == (0, 5, 5, 5, 5, 5, 6, 7)
  assert LCKV.kv_producers == (0, 6, 7)
  plain = override(LCKV, {"attention": AttentionConfig(n_heads=4, n_kv_heads=1)})
  lckv_bytes, plain_bytes = (cache_bytes(init_cache(c, 2, 64)) for c in (LCKV, plain))
  assert lckv_bytes * 8 == plain_bytes * 3  # (K/V-producing layers) / 8, from the arrays
  masked = [s.layer for s in LCKV.kv_plan if s.masks_diagonal]
  assert masked == [1, 2, 3, 4, 5]  # layer 6 reads itself and keeps its diagonal


@pytest.mark.parametrize("fields,message", [
    (dict(warmup=8), "warmup=8 must be in"),
    (dict(warmup=-1), "warmup=-1 must be in"),
    (dict(iterations=0), "iterations must be >= 1"),
    (dict(iterations=2, grad_iterations=3), "grad_iterations=3 must be in"),
    (dict(grad_iterations=0), "grad_iterations=0 must be in"),
    (dict(kv_layout=(0, 9, 9, 9, 9, 9, 9, 7)), "layer 1 reads layer 9, outside"),
    (dict(kv_layout=(0, 2, 1, 1, 1, 1, 6, 7)), "reads layer 2, which does not produce"),
])
def test_bad_lckv_configs_are_refused_naming_the_field(fields, message):
  cfg = override(LCKV, {f"attention.{k}": v for k, v in fields.items()})
  with pytest.raises(ConfigError, match=message):
    cfg.validate()


@pytest.fixture(scope="module")
def lckv():
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 64)
  params = jax.jit(Transformer(LCKV).init)(jax.random.key(0), tokens)["params"]
  return params, tokens


def forward(params, tokens, iterations, **fields):
  cfg = override(LCKV, {"attention.iterations": iterations,
                        "attention.grad_iterations": min(2, iterations),
                        **{f"attention.{k}": v for k, v in fields.items()}})
  return Transformer(cfg).apply({"params": params}, tokens)


def sequential(params, tokens, **fields):
  """The exact sequential computation: one token at a time through the cache."""
  cfg = override(LCKV, {f"attention.{k}": v for k, v in fields.items()})
  model, cache, out = Transformer(cfg), init_cache(cfg, tokens.shape[0], T), []
  for t in range(tokens.shape[1]):
    logits, cache = model.apply({"params": params}, tokens[:, t:t + 1], cache, method="decode")
    out.append(logits)
  return jnp.concatenate(out, axis=1)


def test_decoding_equals_the_exact_forward_and_iterations_converge_to_it(lckv):
  params, tokens = lckv
  exact = sequential(params, tokens)
  chex.assert_trees_all_close(forward(params, tokens, T), exact, atol=1e-5)  # T iterations
  errors = [float(jnp.max(jnp.abs(forward(params, tokens, m) - exact))) for m in (1, 3, 6, 9)]
  assert errors[0] > 1e-3 and all(a >= b for a, b in zip(errors, errors[1:], strict=False))
  # After m iterations the first m positions are exact.
  chex.assert_trees_all_close(forward(params, tokens, 4)[:, :4], exact[:, :4], atol=1e-5)


def test_chunked_prefill_is_exact_up_to_the_iterations(lckv):
  params, tokens = lckv
  model = Transformer(LCKV)  # m = 7: a chunk of <= 7 tokens runs exactly
  cache, pieces = init_cache(LCKV, 2, T), []
  for a, b in ((0, 6), (6, 7), (7, 10)):
    logits, cache = model.apply({"params": params}, tokens[:, a:b], cache, method="decode")
    pieces.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(pieces, 1), sequential(params, tokens), atol=1e-5)


def test_explicit_layout_reading_a_later_layer(lckv):
  params, tokens = lckv  # 8 layers all reading layer 7 (no warm-up), parameters of 0 and 6 unused
  layout = (7,) * 8
  chex.assert_trees_all_close(forward(params, tokens, T, kv_layout=layout),
                              sequential(params, tokens, kv_layout=layout), atol=1e-5)


@pytest.mark.slow  # the slow tier: a gradient through every iteration
def test_gradients_flow_through_the_last_iterations_only(lckv):
  params, tokens = lckv

  def loss(p, grad_iterations):
    cfg = override(LCKV, {"attention.grad_iterations": grad_iterations})
    logits = Transformer(cfg).apply({"params": p}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tokens[..., None], -1)[..., 0])

  g1, g7 = (jax.grad(loss)(params, b) for b in (1, 7))
  leaves1, leaves7 = jax.tree.leaves(g1), jax.tree.leaves(g7)
  assert all(np.isfinite(x).all() for x in leaves1 + leaves7)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves1, leaves7, strict=True)) > 1e-6
  # The value is the same: only the backward pass is truncated.
  chex.assert_trees_all_close(loss(params, 1), loss(params, 7), atol=1e-6)

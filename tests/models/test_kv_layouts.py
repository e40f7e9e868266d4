"""K/V layouts beyond Cross-Layer Attention: sliding windows with ring-buffer caches (YOCO-like
layouts, arXiv 2405.05254) and the seam that lets the attention component run the blocks.

Sliding-window attention is checked against a numpy banded mask; cached decoding with ring
buffers (one token at a time, in chunks longer than the ring, and ragged prompts through
`generate`) against the full forward pass.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import override
from jaxtricks.decode import cache_bytes, generate, init_cache
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.models.trunk import run_sequential
from jaxtricks.ops.attention import attention, kv_bytes_per_token
from jaxtricks.ops.kv_layout import ring_size

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=4,
                   attention=AttentionConfig(n_heads=4, n_kv_heads=2))
WINDOW = 3
LAYOUTS = {
    "window_everywhere": dict(window=WINDOW),
    "yoco_like": dict(kv_layout=(0, 1, 2, 2), window=WINDOW, window_layers=(0, 1)),
    "window_cla2": dict(kv_sharing=2, window=WINDOW),
}


def numpy_attention(q, k, v, mask_TxS):
  """Reference: K/V heads repeated for their query group, explicit mask, zero rows if empty."""
  n, kv_heads = q.shape[2], k.shape[2]
  k = np.repeat(k, n // kv_heads, axis=2)
  v = np.repeat(v, n // kv_heads, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask_TxS, logits, -np.inf)
  m = np.max(logits, axis=-1, keepdims=True)
  p = np.exp(logits - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("impl", ["naive", "xla"])
@pytest.mark.parametrize("window,strict", [(0, True), (1, False), (3, False), (3, True),
                                           (64, False)])
def test_window_and_masked_diagonal_against_a_banded_numpy_mask(impl, window, strict):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=s).astype(np.float32)
             for s in ((2, 9, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8)))
  i, j = np.arange(9)[:, None], np.arange(9)[None]
  mask = (j < i) if strict else (j <= i)
  if window:
    mask &= i - j < window
  out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation=impl,
                  causal=True, window=window, strict=strict)
  chex.assert_trees_all_close(out, numpy_attention(q, k, v, mask), atol=1e-5)
  if strict:
    chex.assert_trees_all_equal(out[:, 0], np.zeros_like(q[:, 0]))  # token 0 sees nothing


@pytest.mark.parametrize("attention_fields,message", [
    (dict(window=-1), "window must be >= 1"),
    (dict(window_layers=(0,)), "need a window >= 1"),
    (dict(window=2, window_layers=(4,)), "window_layers names layer 4, outside"),
    (dict(kv_sharing=2, window=2, window_layers=(0,)), "layer 1 reads the K/V of layer 0"),
])
def test_bad_windows_are_refused_naming_the_field(attention_fields, message):
  cfg = override(BASE, {f"attention.{k}": v for k, v in attention_fields.items()})
  with pytest.raises(ConfigError, match=message):
    cfg.validate()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def windowed(request):
  cfg = override(BASE, {f"attention.{k}": v for k, v in LAYOUTS[request.param].items()})
  cfg.validate()
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), tokens[:, :2])["params"]
  return request.param, model, params, tokens


def test_ring_buffer_caches_are_bounded_by_the_window(windowed):
  name, model, params, _ = windowed
  cfg = model.config
  cache = init_cache(cfg, batch=2, max_len=40, mtp_heads=2)
  for spec in cfg.kv_plan:
    if spec.produces:
      slots = ring_size(WINDOW, 40, 2) if spec.window else 40
      chex.assert_shape(cache[f"layer_{spec.layer}"]["k"], (2, 2, slots, 8))
      assert ("pos" in cache[f"layer_{spec.layer}"]) == bool(spec.window)
  global_producers = {"window_everywhere": 0, "yoco_like": 1, "window_cla2": 0}[name]
  assert kv_bytes_per_token(cfg) == 2 * 2 * 8 * global_producers * 4
  ring_bytes = cache_bytes(cache) - kv_bytes_per_token(cfg) * 2 * 40
  windowed_producers = sum(s.produces and bool(s.window) for s in cfg.kv_plan)
  assert ring_bytes == windowed_producers * 2 * (2 * 2 * 5 * 8 * 4 + 5 * 4)  # K, V and positions


@pytest.mark.parametrize("chunks", [(1,) * 12, (8, 1, 3), (2, 5, 5)])
def test_ring_buffer_decoding_equals_the_full_forward_pass(windowed, chunks):
  _, model, params, tokens = windowed
  full = model.apply({"params": params}, tokens)
  cache, t, pieces = init_cache(model.config, 2, 16), 0, []
  for n in chunks:  # chunks longer than the ring (5 slots) included
    logits, cache = model.apply({"params": params}, tokens[:, t:t + n], cache, method="decode")
    pieces.append(logits)
    t += n
  chex.assert_trees_all_close(jnp.concatenate(pieces, axis=1), full, atol=2e-5)


def test_ragged_prompts_with_ring_buffers_generate_as_if_alone(windowed):
  _, model, params, tokens = windowed
  prompts = [list(np.asarray(tokens[0, :9])), list(np.asarray(tokens[1, :2]))]
  both = generate(model, params, prompts, max_new_tokens=6)
  for row, prompt in enumerate(prompts):
    alone = generate(model, params, [prompt], max_new_tokens=6)
    chex.assert_trees_all_equal(both.tokens[row], alone.tokens[0])
  seq = list(prompts[1])  # greedy against a naive loop over the full forward pass
  for _ in range(6):
    seq.append(int(jnp.argmax(model.apply({"params": params}, jnp.asarray([seq]))[0, -1])))
  assert list(both.tokens[1]) == seq[2:]


@dataclasses.dataclass(frozen=True)
class TwiceThrough(AttentionConfig):
  """A test kind that runs the trunk's blocks twice (a looped Transformer)."""

  def run_blocks(self, model, blocks, x_BxTxD, positions_BxT, cache, train):
    x_BxTxD, _, _ = run_sequential(model.kv_plan, blocks, x_BxTxD, positions_BxT, None, train)
    return run_sequential(model.kv_plan, blocks, x_BxTxD, positions_BxT, None, train)


def test_the_attention_component_runs_the_blocks():
  """The seam: a kind overriding `run_blocks` changes the trunk without touching the model. Two
  passes through 2 blocks equal 4 blocks whose upper two are copies of the lower two."""
  looped = ModelConfig(vocab_size=64, d_model=32, n_layers=2, attention=TwiceThrough(n_heads=4))
  deep = override(looped, {"n_layers": 4, "attention": AttentionConfig(n_heads=4)})
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 64)
  params = Transformer(looped).init(jax.random.key(0), tokens)["params"]
  copied = {**params, "block_2": params["block_0"], "block_3": params["block_1"]}
  # Residual-branch init scales with n_layers: both models use the same parameters here.
  chex.assert_trees_all_close(Transformer(looped).apply({"params": params}, tokens),
                              Transformer(deep).apply({"params": copied}, tokens), atol=1e-6)

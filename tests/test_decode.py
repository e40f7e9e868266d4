"""KV-cache decoding (jaxtricks.decode): the cache allocates K/V for producing layers only (Cross-
Layer Attention, arXiv 2405.12981), cached decoding reproduces the full forward pass, and generate
(greedy, temperature, top-k, top-p of arXiv 1904.09751, stop tokens, ragged prompts) against naive
references.

Parameters are drawn with numpy from the shapes of `model.init` (jax.eval_shape): compiling
`model.init` costs more on a 2-core CPU than every other program here. The cache-equivalence tests
run op by op (no jit): nine model variants would otherwise compile three programs each, while op
by op the compiled kernels are shared between variants.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import override
from jaxtricks.decode import (
  cache_bytes,
  decode_state_bytes,
  filter_logits,
  generate,
  init_cache,
  sample,
)
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops.attention import kv_bytes_per_token
from tests import support

HEADS = {"MHA": 4, "GQA": 2, "MQA": 1}
SHARING = (1, 2, 3)
# 4 layers: CLA2 reads (0, 0, 2, 2), CLA3 reads (0, 1, 1, 1).
BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=4, attention=AttentionConfig(n_heads=4))


def variant(heads: str, sharing: int) -> ModelConfig:
  return override(BASE, {"attention.n_kv_heads": HEADS[heads], "attention.kv_sharing": sharing})


# --- The allocated cache ---------------------------------------------------------------------


@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("heads", list(HEADS))
def test_cache_is_allocated_for_producing_layers_only(heads, sharing):
  cfg = variant(heads, sharing)
  cache = init_cache(cfg, batch=3, max_len=10)
  assert set(cache) == {f"layer_{i}" for i in cfg.kv_producers} | {"lengths"}
  assert len(cfg.kv_producers) == {1: 4, 2: 2, 3: 2}[sharing]
  for i in cfg.kv_producers:
    for name in ("k", "v"):
      chex.assert_shape(cache[f"layer_{i}"][name], (3, HEADS[heads], 10, 8))  # head-major
      chex.assert_type(cache[f"layer_{i}"][name], jnp.float32)
  chex.assert_trees_all_equal(cache["lengths"], np.zeros(3, np.int32))
  assert cache_bytes(cache) == kv_bytes_per_token(cfg) * 3 * 10


def test_mqa_cla2_allocates_exactly_half_of_mqa():
  mqa = cache_bytes(init_cache(variant("MQA", 1), 4, 32))
  cla2 = cache_bytes(init_cache(variant("MQA", 2), 4, 32))
  assert mqa == 2 * 1 * 8 * 4 * 4 * 4 * 32  # K and V, 1 head, H=8, 4 layers, fp32, B=4, S=32
  assert 2 * cla2 == mqa


def test_decode_state_bytes_are_what_init_cache_allocates():
  """Counted from shapes only; the KV bytes per token times the context for full caches, and a
  sliding-window layer's ring buffer is the same at every context."""
  for heads, sharing in [("MQA", 2), ("GQA", 1)]:
    cfg = variant(heads, sharing)
    assert decode_state_bytes(cfg, 40, batch=3) == cache_bytes(init_cache(cfg, 3, 40))
    assert decode_state_bytes(cfg, 40) == 40 * kv_bytes_per_token(cfg)
  ring = override(BASE, {"attention.window": 8, "attention.window_layers": (0, 1, 2, 3)})
  assert decode_state_bytes(ring, 1024) == decode_state_bytes(ring, 4096)


def test_allocated_cache_of_the_cla_paper_models():
  """Table 1 of the CLA paper (20 layers, d_model 2048, 16-bit), from allocated arrays."""
  paper = ModelConfig(d_model=2048, n_layers=20, dtype="bfloat16",
                      attention=AttentionConfig(n_heads=16, n_kv_heads=1))
  per_token = {1: 10_240, 2: 5_120, 3: 3_584}
  for sharing, expected in per_token.items():
    cache = init_cache(override(paper, {"attention.kv_sharing": sharing}), batch=2, max_len=3)
    chex.assert_type(cache["layer_0"]["k"], jnp.bfloat16)
    assert cache_bytes(cache) == expected * 2 * 3
  assert per_token[2] * 2 == per_token[1]


# --- Cached decoding equals the full forward pass ----------------------------------------------

B, T, MAX_LEN = 2, 12, 14
# Prefill 3 tokens, then 3 steps of one token, then 2 steps of a block of 3 tokens: 12 tokens
# (prefill and block steps share one shape, so op by op they share compiled kernels).
CHUNKS = ((0, 3), (3, 4), (4, 5), (5, 6), (6, 9), (9, 12))


@pytest.mark.parametrize("sharing", SHARING, ids=[f"CLA{s}" for s in SHARING])
@pytest.mark.parametrize("heads", list(HEADS))
def test_cached_decoding_equals_full_forward(heads, sharing):
  """Prefill, single-token steps and 3-token blocks with the cache give the logits of one full
  forward pass over the same tokens (float32, atol 1e-5)."""
  cfg = variant(heads, sharing)
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(sharing).integers(0, 64, (B, T)), jnp.int32)
  params = support.random_params(model, tokens, seed=HEADS[heads])
  full = np.asarray(model.apply({"params": params}, tokens))
  cache = init_cache(cfg, B, MAX_LEN)  # 2 slots stay unwritten: the length mask must hide them
  pieces = []
  for start, stop in CHUNKS:
    logits, cache = model.apply({"params": params}, tokens[:, start:stop], cache, method="decode")
    chex.assert_shape(logits, (B, stop - start, cfg.vocab_size))
    chex.assert_trees_all_equal(cache["lengths"], np.full(B, stop))
    pieces.append(np.asarray(logits))
  assert set(cache) == {f"layer_{i}" for i in cfg.kv_producers} | {"lengths"}
  chex.assert_trees_all_close(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-5)
  assert np.abs(full).max() > 0.5  # the logits are not trivially small


# --- generate ---------------------------------------------------------------------------------

GEN_CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2,  # GQA-CLA2: layer 1 reuses 0's K/V
                      attention=AttentionConfig(n_heads=4, n_kv_heads=2, kv_sharing=2))
PROMPTS = [[5, 17, 3], [9, 1, 60, 22, 7, 7, 30], [44, 2, 8, 13, 50]]
N_NEW, GEN_LEN = 6, 16


@pytest.fixture(scope="module")
def gen():
  model = Transformer(GEN_CFG)
  params = support.random_params(model, jnp.zeros((1, 4), jnp.int32), seed=7)
  full = jax.jit(lambda tokens: model.apply({"params": params}, tokens))

  def next_logits(seq):
    """Logits after `seq` from a full forward pass (right-padded to GEN_LEN; causal)."""
    padded = np.zeros((1, GEN_LEN), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(full(padded))[0, len(seq) - 1]

  greedy = generate(model, params, PROMPTS, N_NEW, max_len=GEN_LEN)
  return model, params, next_logits, greedy


def test_greedy_is_deterministic(gen):
  model, params, _, greedy = gen
  again = generate(model, params, PROMPTS, N_NEW, max_len=GEN_LEN)
  chex.assert_shape(greedy.tokens, (len(PROMPTS), N_NEW))
  chex.assert_trees_all_equal(greedy.tokens, again.tokens)
  chex.assert_trees_all_equal(greedy.lengths, np.full(len(PROMPTS), N_NEW))
  chex.assert_trees_all_equal(again.lengths, greedy.lengths)
  assert greedy.forward_passes == again.forward_passes == N_NEW


def test_greedy_equals_a_naive_loop_over_the_full_forward_pass(gen):
  _, _, next_logits, greedy = gen
  for row, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(N_NEW):
      seq.append(int(np.argmax(next_logits(seq))))
    assert greedy.tokens[row].tolist() == seq[len(prompt):], row


def test_each_row_of_a_ragged_batch_equals_generating_it_alone(gen):
  """Alone, with the default cache length (prompt + new tokens) instead of GEN_LEN."""
  model, params, _, greedy = gen
  for row, prompt in enumerate(PROMPTS):
    alone = generate(model, params, [prompt], N_NEW)
    np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[row], err_msg=f"row {row}")
    assert alone.lengths[0] == N_NEW


def test_stop_tokens_stop_a_row(gen):
  model, params, _, greedy = gen
  stops = (int(greedy.tokens[0, 2]), int(greedy.tokens[1, 1]))
  out = generate(model, params, PROMPTS, N_NEW, max_len=GEN_LEN, stop_tokens=stops)
  for row in range(len(PROMPTS)):
    free = greedy.tokens[row].tolist()
    hits = [j for j, tok in enumerate(free) if tok in stops]
    n = hits[0] + 1 if hits else N_NEW  # the stop token itself is emitted and counted
    assert out.lengths[row] == n, row
    assert out.tokens[row, :n].tolist() == free[:n], row
    assert not out.tokens[row, n:].any(), row  # zeros after the stop
  assert out.lengths[0] <= 3 and out.lengths[1] <= 2
  assert out.forward_passes == out.lengths.max()  # the loop ends when every row has stopped


def test_top_k_1_sampling_equals_greedy(gen):
  model, params, _, greedy = gen
  for seed in (0, 1):
    out = generate(model, params, PROMPTS, N_NEW, max_len=GEN_LEN, temperature=1.3, top_k=1,
                   rng=jax.random.key(seed))
    chex.assert_trees_all_equal(out.tokens, greedy.tokens)


def nucleus(logits, p):
  """numpy: indices of the smallest set of most likely tokens whose probability mass is >= p."""
  order = np.argsort(-logits.astype(np.float64))
  probs = np.exp(logits[order] - logits.max())
  probs /= probs.sum()
  n = int(np.searchsorted(np.cumsum(probs), p)) + 1  # first prefix with mass >= p
  return set(order[:min(n, len(order))].tolist())


def test_temperature_top_p_sampling_is_reproducible_and_stays_in_the_nucleus(gen):
  model, params, next_logits, _ = gen
  kw = dict(max_len=GEN_LEN, temperature=0.8, top_p=0.5)
  a = generate(model, params, PROMPTS, N_NEW, rng=jax.random.key(11), **kw)
  b = generate(model, params, PROMPTS, N_NEW, rng=jax.random.key(11), **kw)
  c = generate(model, params, PROMPTS, N_NEW, rng=jax.random.key(12), **kw)
  chex.assert_trees_all_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()  # another key, other samples
  sizes = []
  for row, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for tok in a.tokens[row].tolist():
      allowed = nucleus(next_logits(seq) / 0.8, 0.5)
      sizes.append(len(allowed))
      assert tok in allowed, (row, len(seq), tok, sorted(allowed))
      seq.append(tok)
  assert max(sizes) > 1  # the nucleus is not just the argmax, so the check has teeth


def numpy_filter(logits, top_k=0, top_p=1.0):
  """Reference for filter_logits: boolean mask of the kept tokens, row by row."""
  keep = np.ones(logits.shape, bool)
  for b, row in enumerate(logits.astype(np.float64)):
    allowed = np.arange(len(row))
    if top_k:
      allowed = np.argsort(-row)[:top_k]
    if top_p < 1.0:
      sub = nucleus(row[allowed], top_p)
      allowed = allowed[sorted(sub)]
    keep[b] = np.isin(np.arange(len(row)), allowed)
  return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.05), (0, 0.3),
                                         (0, 0.5), (0, 0.9), (0, 0.999), (10, 0.5), (3, 0.99)])
def test_filter_logits_against_numpy(top_k, top_p):
  logits = np.random.default_rng(3).normal(0, 2, (6, 50)).astype(np.float32)
  got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
  keep = numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), keep)
  np.testing.assert_array_equal(got[keep], logits[keep])  # kept logits are unchanged
  assert np.all(got[~keep] == -np.inf)
  if top_p < 1.0 and not top_k:  # the kept set is the smallest one with mass >= p
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mass = np.where(keep, probs, 0).sum(-1)
    smallest = np.where(keep, probs, np.inf).min(-1)
    assert np.all(mass >= top_p - 1e-6) and np.all(mass - smallest < top_p)


def test_sample_greedy_and_top_k_1():
  logits = jnp.asarray(np.random.default_rng(4).normal(0, 1, (5, 20)), jnp.float32)
  argmax = np.argmax(np.asarray(logits), -1)
  np.testing.assert_array_equal(sample(logits, jax.random.key(0)), argmax)
  np.testing.assert_array_equal(sample(logits, jax.random.key(0), temperature=2.0, top_k=1),
                                argmax)


BAD_CALLS = {
    "empty prompt": (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    "no prompts": (dict(prompts=[]), "at least one prompt"),
    "too long for max_len": (dict(prompts=[[1] * 10], max_new_tokens=7, max_len=16),
                             "10 tokens plus 7 new tokens exceeds the cache length 16"),
    "prompt longer than max_len": (dict(prompts=[[1] * 20], max_new_tokens=1, max_len=16),
                                   "exceeds the cache length 16"),
    "zero new tokens": (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    "negative new tokens": (dict(max_new_tokens=-3), "max_new_tokens must be >= 1, got -3"),
    "negative temperature": (dict(temperature=-0.5), "temperature=-0.5 must be finite and >= 0"),
    "top_p zero": (dict(temperature=1.0, top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    "top_p above one": (dict(temperature=1.0, top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    "negative top_k": (dict(temperature=1.0, top_k=-1), r"top_k=-1 must be in \[0, 64\]"),
    "top_k above the vocabulary": (dict(temperature=1.0, top_k=65),
                                   r"top_k=65 must be in \[0, 64\]"),
    "nan temperature": (dict(temperature=float("nan")), "temperature=nan must be finite"),
    "infinite temperature": (dict(temperature=float("inf")), "temperature=inf must be finite"),
    "float new tokens": (dict(max_new_tokens=2.5), "max_new_tokens must be an int, got 2.5"),
    "token outside the vocabulary": (dict(prompts=[[1, 2], [3, 64]]),
                                     r"prompt 1 has token 64 outside the vocabulary \[0, 64\)"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_inputs_are_refused_with_clear_messages(gen, case):
  model, params, _, _ = gen
  kw, message = case
  kw = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kw}
  with pytest.raises(ValueError, match=message):
    generate(model, params, kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)


"""Generation with a KV cache: prefill in one pass, then one token per step (a block of tokens per
step for speculative decoding), greedy / temperature / top-k / top-p (Holtzman et al. 2019, arXiv
1904.09751) sampling, stop tokens, a batch of prompts of different lengths.

The cache holds (B, S_max, K, H) keys (after RoPE) and values for K/V-producing layers only, so a
Cross-Layer Attention model with sharing factor s allocates 1/s of the memory; `lengths` (B,) is
each row's number of cached tokens. The whole generation loop is one jitted function, compiled
once per (batch, prompt length, new tokens, cache length, sampling settings).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks.layers.dtypes import resolve_dtype


def init_cache(config, batch: int, max_len: int) -> dict:
  """Zeroed cache for the K/V-producing layers of `config` (a ModelConfig)."""
  shape = (batch, max_len, config.kv_heads, config.dim_per_head)
  dtype = resolve_dtype(config.dtype)
  cache = {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
           for i in config.kv_producers}
  cache["lengths"] = jnp.zeros((batch,), jnp.int32)
  return cache


def cache_bytes(cache: dict) -> int:
  """Bytes of the K/V arrays actually allocated (lengths excluded)."""
  return int(sum(x.nbytes for name, layer in cache.items() if name != "lengths"
                 for x in jax.tree.leaves(layer)))


def pad_prompts(prompts: Sequence[Sequence[int]] | np.ndarray, max_len: int, max_new_tokens: int,
                vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads prompts to one length; checks each fits the cache with its new tokens."""
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    raise ValueError("generate needs at least one prompt")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() == 0:
    raise ValueError(f"prompt {int(np.argmin(lengths))} is empty; every prompt needs >= 1 token")
  if vocab_size is not None:
    for i, p in enumerate(prompts):
      bad = [t for t in p if not 0 <= t < vocab_size]
      if bad:
        raise ValueError(f"prompt {i} has token {bad[0]} outside the vocabulary [0, {vocab_size})")
  if lengths.max() + max_new_tokens > max_len:
    raise ValueError(f"prompt of {lengths.max()} tokens plus {max_new_tokens} new tokens exceeds "
                     f"the cache length {max_len}")
  tokens = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


def filter_logits(logits_BxV: jnp.ndarray, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
  """Sets logits outside the top-k and outside the top-p nucleus to -inf (keeps >= 1 token)."""
  if top_k:
    kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is kept while the mass before it is < top_p; the first token is always kept.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_B = jnp.sum(mass_before_BxV < top_p, axis=-1, keepdims=True)
    threshold_B = jnp.take_along_axis(sorted_BxV, n_keep_B - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < threshold_B, -jnp.inf, logits_BxV)
  return logits_BxV


def sample(logits_BxV: jnp.ndarray, rng: jnp.ndarray, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jnp.ndarray:
  """Greedy when temperature == 0, else a sample from the filtered, tempered distribution."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray      # (B, max_new_tokens) generated tokens, 0 after a stop
  lengths: np.ndarray     # (B,) tokens generated per row (a stop token included)
  forward_passes: int     # model calls after prefill


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "max_len", "temperature",
                                             "top_k", "top_p", "stop_tokens"))
def _generate(params, tokens_BxP, lengths_B, rng, *, model, max_new_tokens, max_len,
              temperature, top_k, top_p, stop_tokens):
  b = tokens_BxP.shape[0]
  cache = init_cache(model.config, b, max_len)
  logits_BxPxV, cache = model.apply({"params": params}, tokens_BxP, cache=cache)
  cache["lengths"] = lengths_B
  last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  stops = jnp.array(stop_tokens or (-1,), jnp.int32)

  def body(carry):
    i, cache, last_BxV, out_BxN, n_B, done_B, rng = carry
    rng, key = jax.random.split(rng) if temperature else (rng, rng)
    tok_B = sample(last_BxV, key, temperature, top_k, top_p)
    tok_B = jnp.where(done_B, 0, tok_B)
    out_BxN = out_BxN.at[:, i].set(tok_B)
    n_B = n_B + (~done_B).astype(jnp.int32)
    done_B = done_B | jnp.isin(tok_B, stops)
    logits_Bx1xV, cache = model.apply({"params": params}, tok_B[:, None], cache=cache)
    return i + 1, cache, logits_Bx1xV[:, 0], out_BxN, n_B, done_B, rng

  def cond(carry):
    i, *_, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  init = (jnp.int32(0), cache, last_BxV, jnp.zeros((b, max_new_tokens), jnp.int32),
          jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), rng)
  i, _, _, out_BxN, n_B, _, _ = jax.lax.while_loop(cond, body, init)
  return out_BxN, n_B, i


def generate(model, params, prompts: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), rng: jnp.ndarray | None = None,
             max_len: int | None = None) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens with a KV cache.

  model: a jaxtricks Transformer; prompts: token lists of any lengths >= 1; max_len: cache length
  (default: longest prompt + max_new_tokens). A row stops after emitting a stop token.
  """
  vocab = model.config.vocab_size
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
    raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  # Written as `not lo <= x <= hi` so that NaN is refused too.
  if not 0 <= temperature < float("inf"):
    raise ValueError(f"temperature={temperature} must be finite and >= 0 (0: greedy)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if not 0 <= top_k <= vocab:
    raise ValueError(f"top_k={top_k} must be in [0, {vocab}] (the vocabulary size; 0: off)")
  longest = max((len(p) for p in prompts), default=0)
  max_len = max_len or longest + max_new_tokens
  tokens_BxP, lengths_B = pad_prompts(prompts, max_len, max_new_tokens, vocab)
  rng = jax.random.key(0) if rng is None else rng
  out, n, steps = _generate(params, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), rng,
                            model=model, max_new_tokens=max_new_tokens, max_len=max_len,
                            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                            stop_tokens=tuple(int(t) for t in stop_tokens))
  return Generation(np.asarray(out), np.asarray(n), int(steps))

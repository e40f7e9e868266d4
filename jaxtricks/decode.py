"""Generation with a KV cache: prefill in one pass, then one token per step (a block of tokens per
step for speculative decoding), greedy / temperature / top-k / top-p (Holtzman et al. 2019, arXiv
1904.09751) sampling, stop tokens, a batch of prompts of different lengths.

The cache holds keys (after RoPE) and values as (B, K, S_max, H) arrays, head-major because
decoding reads that layout fastest, for K/V-producing layers only, so a Cross-Layer Attention model
with sharing factor s allocates 1/s of the memory (a sliding-window layer holds a ring buffer of
about its window instead of S_max); `lengths` (B,) is each row's number of cached tokens. The
whole generation loop is one jitted function, compiled once per (batch, prompt length, new
tokens, cache length, sampling settings).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks.ops.mtp import greedy_accepts, speculative_accepts


def init_cache(config, batch: int, max_len: int, mtp_heads: int = 1) -> dict:
  """Zeroed decode cache of `config` (a ModelConfig): each component's entries (the K/V of the
  producing layers; the caches of multi-token heads 2..mtp_heads that have one, for
  self-speculative decoding) and `lengths`, each row's number of cached tokens."""
  cache = {}
  for component in config.components():
    cache.update(component.cache_entries(config, batch, max_len, mtp_heads))
  cache["lengths"] = jnp.zeros((batch,), jnp.int32)
  return cache


def prefill_limits(cache: dict, lengths_B: jnp.ndarray) -> dict:
  """The cache for prefilling right-padded prompts of lengths_B: sliding-window layers' ring
  buffers then skip the padding, which would overwrite positions still in the window."""
  return {**cache, "limits": lengths_B}


def end_prefill(cache: dict, lengths_B: jnp.ndarray) -> dict:
  """The cache after a padded prefill: each row's length is its prompt's."""
  cache = {name: entry for name, entry in cache.items() if name != "limits"}
  cache["lengths"] = lengths_B
  return cache


def cache_bytes(cache: dict) -> int:
  """Bytes of the cache arrays actually allocated (K/V and ring positions; lengths excluded);
  arrays or their shapes (jax.ShapeDtypeStruct)."""
  return int(sum(x.size * x.dtype.itemsize for name, layer in cache.items()
                 if name not in ("lengths", "limits") for x in jax.tree.leaves(layer)))


def decode_state_bytes(config, context: int, batch: int = 1) -> int:
  """Bytes of the decode cache `init_cache` allocates for `batch` sequences of `context` tokens
  (every component's entries; nothing is allocated): kv_bytes_per_token * context for full KV
  caches, a constant for ring buffers and recurrent states."""
  return cache_bytes(jax.eval_shape(lambda: init_cache(config, batch, context)))


@functools.partial(jax.jit, static_argnames=("model",))
def teacher_forced_logits(model, params, tokens_BxT: jnp.ndarray) -> jnp.ndarray:
  """Logits (B, T, V) of `tokens_BxT` computed one token at a time through the cache: the exact
  sequential computation (for LCKV, which trains and prefills by iterating; for any other model
  it equals the forward pass)."""
  b, t = tokens_BxT.shape

  def step(cache, tok_B):
    logits_Bx1xV, cache = model.apply({"params": params}, tok_B[:, None], cache, method="decode")
    return cache, logits_Bx1xV[:, 0]

  _, logits_TxBxV = jax.lax.scan(step, init_cache(model.config, b, t), tokens_BxT.T)
  return jnp.swapaxes(logits_TxBxV, 0, 1)


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
  cache = prefill_limits(init_cache(model.config, b, max_len), lengths_B)
  logits_BxPxV, cache = model.apply({"params": params}, tokens_BxP, cache, method="decode")
  cache = end_prefill(cache, lengths_B)
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
    logits_Bx1xV, cache = model.apply({"params": params}, tok_B[:, None], cache,
                                      method="decode")
    return i + 1, cache, logits_Bx1xV[:, 0], out_BxN, n_B, done_B, rng

  def cond(carry):
    i, *_, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  init = (jnp.int32(0), cache, last_BxV, jnp.zeros((b, max_new_tokens), jnp.int32),
          jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), rng)
  i, _, _, out_BxN, n_B, _, _ = jax.lax.while_loop(cond, body, init)
  return out_BxN, n_B, i


def check_settings(model, max_new_tokens: int, temperature: float, top_k: int,
                   top_p: float) -> None:
  """Refuses bad decoding arguments with a one-line ValueError naming the argument."""
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


def generate(model, params, prompts: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), rng: jnp.ndarray | None = None,
             max_len: int | None = None) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens with a KV cache.

  model: a jaxtricks Transformer; prompts: token lists of any lengths >= 1; max_len: cache length
  (default: longest prompt + max_new_tokens). A row stops after emitting a stop token.
  """
  check_settings(model, max_new_tokens, temperature, top_k, top_p)
  longest = max((len(p) for p in prompts), default=0)
  max_len = max_len or longest + max_new_tokens
  tokens_BxP, lengths_B = pad_prompts(prompts, max_len, max_new_tokens, model.config.vocab_size)
  rng = jax.random.key(0) if rng is None else rng
  out, n, steps = _generate(params, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), rng,
                            model=model, max_new_tokens=max_new_tokens, max_len=max_len,
                            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                            stop_tokens=tuple(int(t) for t in stop_tokens))
  return Generation(np.asarray(out), np.asarray(n), int(steps))


@dataclasses.dataclass
class SpeculativeGeneration(Generation):
  tokens_per_forward: float = 0.0             # generated tokens / verification passes (all rows)
  acceptance_per_position: tuple[float, ...] = ()  # P(draft j accepted | drafts < j accepted)


def _draft(logits_JxBxV, key, temperature, top_k, top_p):
  """Drafts (B, J) from heads 2..k and, when sampling, their distributions q (B, J, V)."""
  if temperature == 0.0:
    return jnp.argmax(logits_JxBxV, axis=-1).astype(jnp.int32).T, None
  logits_JxBxV = jax.vmap(lambda x: filter_logits(x / temperature, top_k, top_p))(logits_JxBxV)
  drafts_JxB = jax.random.categorical(key, logits_JxBxV, axis=-1).astype(jnp.int32)
  return drafts_JxB.T, jnp.moveaxis(jax.nn.softmax(logits_JxBxV, axis=-1), 0, 1)


def _chain(step, project, h_BxD, tok_B, pos_B, cache, k, key, temperature, top_k, top_p):
  """Drafts (B, J), their distributions (sampling) and the cache, from modules 1..k-1 chained at
  positions pos_B: module j reads module j - 1's state (the trunk's for j = 1) and the token after
  it (tok_B, then each module's draft), and writes its cache there."""
  h_Bx1xD, drafts, qs = h_BxD[:, None], [], []
  for j, key_j in zip(range(1, k), jax.random.split(key, max(k - 1, 1)), strict=False):
    h_Bx1xD, cache = step(h_Bx1xD, tok_B[:, None], pos_B[:, None], cache, j)
    d_Bx1, q = _draft(project(h_Bx1xD[:, 0])[None], key_j, temperature, top_k, top_p)
    tok_B = d_Bx1[:, 0]
    drafts.append(tok_B)
    qs.append(q)
  drafts_BxJ = jnp.stack(drafts, 1) if drafts else jnp.zeros((h_BxD.shape[0], 0), jnp.int32)
  q_BxJxV = jnp.concatenate(qs, axis=1) if temperature and qs else None
  return drafts_BxJ, q_BxJxV, cache


def emit_block(block_BxK, a_B, out_BxN, n_B, done_B, accepted_J, tried_J, stops,
               max_new_tokens: int):
  """Emits each active row's first a + 1 tokens of its verified block, cut after a stop token
  and at max_new_tokens: (out, n, done, accepted drafts per position, tried per position)."""
  k = block_BxK.shape[1]
  slot_K = jnp.arange(k)
  active_B = ~done_B
  stop_BxK = jnp.isin(block_BxK, stops) & (slot_K <= a_B[:, None])
  count_B = jnp.where(jnp.any(stop_BxK, axis=1), jnp.argmax(stop_BxK, axis=1) + 1, a_B + 1)
  count_B = jnp.where(active_B, jnp.minimum(count_B, max_new_tokens - n_B), 0)
  emitted_BxK = jnp.where(slot_K < count_B[:, None], block_BxK, 0)
  out_BxN = jax.vmap(lambda o, x, i: jax.lax.dynamic_update_slice(o, x, (i,)))(
      out_BxN, emitted_BxK, n_B)
  n_B = n_B + count_B
  done_B = done_B | jnp.any(stop_BxK & (slot_K < count_B[:, None]), axis=1)
  done_B = done_B | (n_B >= max_new_tokens)
  slot_J = slot_K[:k - 1]
  tried_J = tried_J + jnp.sum(active_B[:, None] & (a_B[:, None] >= slot_J), axis=0)
  accepted_J = accepted_J + jnp.sum(active_B[:, None] & (a_B[:, None] > slot_J), axis=0)
  return out_BxN, n_B, done_B, accepted_J, tried_J


class _Speculation(NamedTuple):
  """The loop state of self-speculative decoding (B rows, k heads, J = k - 1 drafts, N slots)."""
  it: jnp.ndarray            # () passes so far
  cache: dict
  next_B: jnp.ndarray        # the next token of each row (already decided)
  drafts_BxJ: jnp.ndarray    # heads 2..k's drafts of the tokens after it
  q_BxJxV: jnp.ndarray       # the drafts' distributions (sampling)
  out_BxN: jnp.ndarray       # emitted tokens
  n_B: jnp.ndarray           # emitted count per row
  done_B: jnp.ndarray        # row finished (stop token or max_new_tokens)
  passes_B: jnp.ndarray      # verification passes per row while active
  accepted_J: jnp.ndarray    # accepted drafts per draft position
  tried_J: jnp.ndarray       # drafts tried per draft position
  rng: jnp.ndarray


@functools.partial(jax.jit, static_argnames=("model", "k", "max_new_tokens", "max_len",
                                             "temperature", "top_k", "top_p", "stop_tokens"))
def _speculate(params, tokens_BxP, lengths_B, rng, *, model, k, max_new_tokens, max_len,
               temperature, top_k, top_p, stop_tokens):
  b = tokens_BxP.shape[0]
  variables = {"params": params}
  project = lambda h: model.apply(variables, h, method="project")
  heads = lambda toks, cache: model.apply(variables, toks, cache, k,
                                          method="decode_heads_hidden")
  step = lambda h, toks, pos, cache, j: model.apply(variables, h, toks, pos, cache, j,
                                                    method="draft_step")
  chains = model.config.mtp.chains
  draft_args = (temperature, top_k, top_p)
  h_KxBxPxD, cache = heads(tokens_BxP, prefill_limits(init_cache(model.config, b, max_len,
                                                                  mtp_heads=k), lengths_B))
  cache = end_prefill(cache, lengths_B)
  h_KxBxD = jnp.take_along_axis(h_KxBxPxD, (lengths_B - 1)[None, :, None, None], axis=2)[:, :, 0]
  rng, k_first, key = jax.random.split(rng, 3)
  logits_KxBxV = project(h_KxBxD)
  y_B = sample(logits_KxBxV[0], k_first, temperature, top_k, top_p)
  if chains:
    drafts_BxJ, q_BxJxV, cache = _chain(step, project, h_KxBxD[0], y_B, lengths_B - 1, cache, k,
                                        key, *draft_args)
  else:
    drafts_BxJ, q_BxJxV = _draft(logits_KxBxV[1:], key, *draft_args)
  stops = jnp.array(stop_tokens or (-1,), jnp.int32)

  def body(s: _Speculation) -> _Speculation:
    cache, y_B, drafts_BxJ, q_BxJxV, n_B = s.cache, s.next_B, s.drafts_BxJ, s.q_BxJxV, s.n_B
    rng, k_accept, k_bonus, k_draft = jax.random.split(s.rng, 4)
    block_BxK = jnp.concatenate([y_B[:, None], drafts_BxJ], axis=1)
    h_KxBxKxD, new_cache = heads(block_BxK, cache)
    logits_BxKxV = project(h_KxBxKxD[0])  # the next-token head after each block position
    if temperature == 0.0:
      pred_BxK = jnp.argmax(logits_BxKxV, axis=-1).astype(jnp.int32)
      a_B = greedy_accepts(drafts_BxJ, pred_BxK[:, :k - 1])
      next_B = jnp.take_along_axis(pred_BxK, a_B[:, None], axis=1)[:, 0]
    else:
      p_BxKxV = jax.nn.softmax(jax.vmap(
          lambda x: filter_logits(x / temperature, top_k, top_p), in_axes=1, out_axes=1)(
              logits_BxKxV), axis=-1)
      bonus_B = jax.random.categorical(k_bonus, jnp.log(p_BxKxV[:, -1]), axis=-1).astype(jnp.int32)
      if k == 1:
        a_B, next_B = jnp.zeros((b,), jnp.int32), bonus_B
      else:
        a_B, resample_B = speculative_accepts(p_BxKxV[:, :-1], q_BxJxV, drafts_BxJ, k_accept)
        next_B = jnp.where(a_B == k - 1, bonus_B, resample_B)
    active_B = ~s.done_B
    out_BxN, n_B, done_B, accepted_J, tried_J = emit_block(
        block_BxK, a_B, s.out_BxN, n_B, s.done_B, s.accepted_J, s.tried_J, stops, max_new_tokens)
    # Roll the cache back to the accepted prefix: later slots are overwritten before being read.
    new_cache["lengths"] = cache["lengths"] + jnp.where(active_B, a_B + 1, 0)
    # Drafts from the heads' states at the last accepted position (head 1's is in logits_BxKxV),
    # or chained from the trunk's state there.
    if chains:
      h_BxD = jnp.take_along_axis(h_KxBxKxD[0], a_B[:, None, None], axis=1)[:, 0]
      drafts_BxJ, q_next, new_cache = _chain(step, project, h_BxD, next_B,
                                             new_cache["lengths"] - 1, new_cache, k, k_draft,
                                             *draft_args)
    else:
      h_JxBxD = jnp.take_along_axis(h_KxBxKxD[1:], a_B[None, :, None, None], axis=2)[:, :, 0]
      drafts_BxJ, q_next = _draft(project(h_JxBxD), k_draft, *draft_args)
    q_BxJxV = q_BxJxV if q_next is None else q_next
    return _Speculation(s.it + 1, new_cache, next_B, drafts_BxJ, q_BxJxV, out_BxN, n_B, done_B,
                        s.passes_B + active_B.astype(jnp.int32), accepted_J, tried_J, rng)

  def cond(s: _Speculation) -> jnp.ndarray:
    return (s.it < max_new_tokens) & ~jnp.all(s.done_B)

  zeros_J = jnp.zeros((k - 1,), jnp.int32)
  init = _Speculation(jnp.int32(0), cache, y_B, drafts_BxJ, q_BxJxV,
                      jnp.zeros((b, max_new_tokens + k), jnp.int32), jnp.zeros((b,), jnp.int32),
                      jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), zeros_J, zeros_J, rng)
  s = jax.lax.while_loop(cond, body, init)
  return s.out_BxN[:, :max_new_tokens], s.n_B, s.it, s.passes_B, s.accepted_J, s.tried_J


def speculative_generate(model, params, prompts: Sequence[Sequence[int]] | np.ndarray,
                         max_new_tokens: int, *, n_heads: int | None = None,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         stop_tokens: Sequence[int] = (), rng: jnp.ndarray | None = None
                         ) -> SpeculativeGeneration:
  """Self-speculative decoding with the heads of a multi-token model (arXiv 2404.19737, 3.2).

  Each forward pass feeds the next token and the k - 1 drafts of heads 2..k (parallel heads
  draft from one state; sequential modules, DeepSeek-V3's, chain one module at a time from the
  last accepted state, each with its own cache), accepts the longest
  prefix the next-token head agrees with (greedy) or the Leviathan et al. rule (sampling), emits
  it plus one corrected token, and drafts again from the same pass. Greedy output is the same as
  `generate`'s; sampling output has the same distribution. n_heads: k (default: all heads).
  """
  cfg = model.config
  n = cfg.mtp.heads
  k = n if n_heads is None else n_heads
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"n_heads={k!r} must be an int in [1, {n}] (the model's heads)")
  if k > 1 and not cfg.attention.rewinds:
    raise ValueError(f"speculative_generate rolls rejected drafts back; model.attention="
                     f"{cfg.attention.kind!r} keeps a state that cannot be rolled back")
  if not cfg.mtp.can_draft and k > 1:
    raise ValueError(f"speculative_generate drafts with parallel heads; this model's "
                     f"model.mtp={cfg.mtp.kind!r} heads do not draft")
  check_settings(model, max_new_tokens, temperature, top_k, top_p)
  longest = max((len(p) for p in prompts), default=0)
  max_len = longest + max_new_tokens + k  # a block of k slots past the last accepted token
  tokens_BxP, lengths_B = pad_prompts(prompts, max_len, max_new_tokens, cfg.vocab_size)
  rng = jax.random.key(0) if rng is None else rng
  out, n, it, passes, acc, tried = _speculate(
      params, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), rng, model=model, k=int(k),
      max_new_tokens=max_new_tokens, max_len=max_len, temperature=float(temperature),
      top_k=int(top_k), top_p=float(top_p), stop_tokens=tuple(int(t) for t in stop_tokens))
  n, passes, acc, tried = map(np.asarray, (n, passes, acc, tried))
  return SpeculativeGeneration(
      np.asarray(out), n, int(it), tokens_per_forward=float(n.sum() / max(passes.sum(), 1)),
      acceptance_per_position=tuple(float(a / t) if t else 0.0
                                    for a, t in zip(acc, tried, strict=True)))

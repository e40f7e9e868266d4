"""Tree verification for self-speculative decoding (Medusa, Cai et al. 2024, arXiv 2401.10774,
sec. 2.1.2): each pass feeds a static candidate tree built from the top-k tokens of heads 2..D+1
(jaxtricks.ops.tree), verifies every branch at once with a tree attention mask and per-node
positions, emits the longest accepted path plus the next-token head's token after it, and moves
that path's cache rows to the front. Greedy only: its output is `generate`'s, token for token.
Batched, with prompts of any lengths and stop tokens; jitted once per (tree, shapes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks.decode import (
  SpeculativeGeneration,
  _Speculation,
  check_settings,
  emit_block,
  end_prefill,
  init_cache,
  pad_prompts,
  prefill_limits,
)
from jaxtricks.ops.tree import (
  ancestor_mask,
  build_tree,
  check_branching,
  compact_cache,
  node_tokens,
  paths,
  tree_accepts,
)


@functools.partial(jax.jit, static_argnames=("model", "branching", "max_new_tokens", "max_len",
                                             "stop_tokens"))
def _tree_speculate(params, tokens_BxP, lengths_B, *, model, branching, max_new_tokens, max_len,
                    stop_tokens):
  tree = build_tree(branching)
  k = tree.max_depth + 1
  b = tokens_BxP.shape[0]
  variables = {"params": params}
  project = lambda h: model.apply(variables, h, method="project")  # noqa: E731
  heads = lambda toks, cache: model.apply(variables, toks, cache, k,  # noqa: E731
                                          method="decode_heads_hidden")
  shape = {"depth": jnp.asarray(tree.depth, jnp.int32), "mask": jnp.asarray(ancestor_mask(tree))}
  paths_NxA = jnp.asarray(paths(tree))
  h_KxBxPxD, cache = heads(tokens_BxP, prefill_limits(init_cache(model.config, b, max_len,
                                                                  mtp_heads=k), lengths_B))
  cache = end_prefill(cache, lengths_B)
  h_KxBxD = jnp.take_along_axis(h_KxBxPxD, (lengths_B - 1)[None, :, None, None], axis=2)[:, :, 0]
  logits_KxBxV = project(h_KxBxD)
  y_B = jnp.argmax(logits_KxBxV[0], axis=-1).astype(jnp.int32)
  stops = jnp.array(stop_tokens or (-1,), jnp.int32)

  def body(s: _Speculation) -> _Speculation:
    nodes_BxN = s.drafts_BxJ  # the tree's tokens, the root (the next token) first
    h_KxBxNxD, new_cache = heads(nodes_BxN, {**s.cache, "tree": shape})
    new_cache.pop("tree")
    pred_BxN = jnp.argmax(project(h_KxBxNxD[0]), axis=-1).astype(jnp.int32)
    best_B, a_B = tree_accepts(nodes_BxN, pred_BxN, tree)
    path_BxA = paths_NxA[best_B]
    block_BxA = jnp.take_along_axis(nodes_BxN, path_BxA, axis=1)
    next_B = jnp.take_along_axis(pred_BxN, best_B[:, None], axis=1)[:, 0]
    active_B = ~s.done_B
    out_BxN, n_B, done_B, accepted_J, tried_J = emit_block(
        block_BxA, a_B, s.out_BxN, s.n_B, s.done_B, s.accepted_J, s.tried_J, stops,
        max_new_tokens)
    lengths = s.cache["lengths"]
    new_cache = compact_cache(new_cache, lengths, path_BxA)
    new_cache["lengths"] = lengths + jnp.where(active_B, a_B + 1, 0)
    # The next tree from the heads' states at the deepest accepted node.
    h_JxBxD = jnp.take_along_axis(h_KxBxNxD[1:], best_B[None, :, None, None], axis=2)[:, :, 0]
    nodes_BxN = node_tokens(next_B, project(h_JxBxD), tree)
    return _Speculation(s.it + 1, new_cache, next_B, nodes_BxN, s.q_BxJxV, out_BxN, n_B, done_B,
                        s.passes_B + active_B.astype(jnp.int32), accepted_J, tried_J, s.rng)

  def cond(s: _Speculation) -> jnp.ndarray:
    return (s.it < max_new_tokens) & ~jnp.all(s.done_B)

  zeros_J = jnp.zeros((k - 1,), jnp.int32)
  init = _Speculation(jnp.int32(0), cache, y_B, node_tokens(y_B, logits_KxBxV[1:], tree), None,
                      jnp.zeros((b, max_new_tokens + k), jnp.int32), jnp.zeros((b,), jnp.int32),
                      jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), zeros_J, zeros_J,
                      jax.random.key(0))
  s = jax.lax.while_loop(cond, body, init)
  return s.out_BxN[:, :max_new_tokens], s.n_B, s.it, s.passes_B, s.accepted_J, s.tried_J


def check_tree(model, branching: Sequence[int], temperature: float = 0.0) -> None:
  """One-line ValueError when `model` cannot tree-decode with `branching`."""
  cfg = model.config
  if temperature:
    raise ValueError("tree decoding is greedy only (temperature 0): its lossless sampling rule "
                     "is not implemented; sample with speculative_generate's chain")
  if not cfg.mtp.can_draft or cfg.mtp.chains:
    raise ValueError(f"tree decoding drafts every depth from one state with parallel heads; "
                     f"model.mtp={cfg.mtp.kind!r} heads do not")
  if not cfg.attention.tree_decoding:
    raise ValueError(f"model.attention={cfg.attention.kind!r} does not decode candidate trees")
  windowed = [s.layer for s in cfg.kv_plan if s.window]
  if windowed:
    raise ValueError(f"tree decoding needs full KV caches; layers {windowed} have a sliding "
                     f"window (ring buffers)")
  check_branching(branching, cfg.mtp.heads - 1, cfg.vocab_size)


def tree_generate(model, params, prompts: Sequence[Sequence[int]] | np.ndarray,
                  max_new_tokens: int, *, tree: Sequence[int], stop_tokens: Sequence[int] = (),
                  temperature: float = 0.0) -> SpeculativeGeneration:
  """Greedy self-speculative decoding with tree verification; `tree` is the branching per depth
  (e.g. (3, 2, 1): 3 candidates from head 2, 2 from head 3 below each, 1 from head 4). Output is
  `generate`'s; acceptance_per_position is per depth."""
  check_tree(model, tuple(tree), temperature)
  branching = tuple(int(b) for b in tree)
  check_settings(model, max_new_tokens, 0.0, 0, 1.0)
  nodes = build_tree(branching).size
  longest = max((len(p) for p in prompts), default=0)
  max_len = longest + max_new_tokens + nodes  # the tree's slots past the last accepted token
  tokens_BxP, lengths_B = pad_prompts(prompts, max_len, max_new_tokens, model.config.vocab_size)
  out, n, it, passes, acc, tried = _tree_speculate(
      params, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), model=model, branching=branching,
      max_new_tokens=max_new_tokens, max_len=max_len,
      stop_tokens=tuple(int(t) for t in stop_tokens))
  n, passes, acc, tried = map(np.asarray, (n, passes, acc, tried))
  return SpeculativeGeneration(
      np.asarray(out), n, int(it), tokens_per_forward=float(n.sum() / max(passes.sum(), 1)),
      acceptance_per_position=tuple(float(a / t) if t else 0.0
                                    for a, t in zip(acc, tried, strict=True)))

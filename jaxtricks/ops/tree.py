"""Static candidate trees for speculative decoding (Medusa, Cai et al. 2024, arXiv 2401.10774,
sec. 2.1.2; SpecInfer, Miao et al. 2023, arXiv 2305.09781).

A tree of branching (b_1, ..., b_D): the root (depth 0) is the next token, already decided; each
node at depth d - 1 has b_d children, the top-b_d tokens of drafting head d + 1 (ranks 0..b_d - 1),
so the tree has 1 + sum_d prod_{e <= d} b_e nodes. Nodes are kept in breadth-first order, so a
node's index is at least its depth and its parent comes before it. One verification pass feeds
every node at position length + depth, node i seeing the cached prefix and its ancestors (and
itself); node n is accepted when its token is the next-token head's argmax at its parent and its
parent is accepted. Siblings carry different tokens, so the accepted nodes form one path; the
deepest gives the tokens to emit, and the cache rows of that path are moved to the front.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tree:
  """A static tree: per node (breadth-first) its parent (-1 for the root), depth and rank."""
  branching: tuple[int, ...]
  parent: tuple[int, ...]
  depth: tuple[int, ...]
  rank: tuple[int, ...]

  @property
  def size(self) -> int:
    return len(self.parent)

  @property
  def max_depth(self) -> int:
    return len(self.branching)


def check_branching(branching: Sequence[int], drafting_heads: int, vocab_size: int) -> None:
  """One-line ValueError for a tree that cannot be drafted: a branching below 1, deeper than the
  drafting heads (heads 2..n draft depths 1..n - 1), or wider than the vocabulary."""
  branching = tuple(branching)
  if not branching:
    raise ValueError("a tree needs at least one depth (its branching, e.g. (3, 2, 1))")
  for d, b in enumerate(branching, start=1):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
      raise ValueError(f"tree branching {b!r} at depth {d} must be an int >= 1")
    if b > vocab_size:
      raise ValueError(f"tree branching {b} at depth {d} is wider than the vocabulary "
                       f"({vocab_size} tokens)")
  if len(branching) > drafting_heads:
    raise ValueError(f"a tree of depth {len(branching)} needs {len(branching)} drafting heads; "
                     f"the model has {drafting_heads}")


@functools.lru_cache(maxsize=64)
def build_tree(branching: tuple[int, ...]) -> Tree:
  """The Tree of `branching` (see the module docstring)."""
  parent, depth, rank = [-1], [0], [0]
  level = [0]
  for d, b in enumerate(branching, start=1):
    nxt = []
    for p in level:
      for r in range(b):
        nxt.append(len(parent))
        parent.append(p)
        depth.append(d)
        rank.append(r)
    level = nxt
  return Tree(tuple(branching), tuple(parent), tuple(depth), tuple(rank))


def ancestor_mask(tree: Tree) -> np.ndarray:
  """(N, N) bool: [i, j] when node j is node i or one of its ancestors."""
  mask = np.eye(tree.size, dtype=bool)
  for i in range(1, tree.size):  # parents come first: their rows are complete
    mask[i] |= mask[tree.parent[i]]
  return mask


def paths(tree: Tree) -> np.ndarray:
  """(N, D + 1) int: the nodes from the root to node i, then node i repeated."""
  out = np.zeros((tree.size, tree.max_depth + 1), np.int32)
  for i in range(tree.size):
    chain, n = [], i
    while n >= 0:
      chain.append(n)
      n = tree.parent[n]
    chain = chain[::-1]
    out[i] = chain + [i] * (tree.max_depth + 1 - len(chain))
  return out


def tree_cache_mask(lengths_B: jnp.ndarray, slots: int, mask_NxN: jnp.ndarray) -> jnp.ndarray:
  """(B, N, S) visibility of cache slots for the N tree nodes written at slots length..length+N-1:
  every cached slot before the length, and the node's ancestors (itself included)."""
  chex.assert_rank(lengths_B, 1, custom_message="tree_cache_mask: lengths_B")
  n = mask_NxN.shape[0]
  rel_BxS = jnp.arange(slots)[None] - lengths_B[:, None]
  in_tree_BxS = (rel_BxS >= 0) & (rel_BxS < n)
  tree_BxNxS = jnp.take(jnp.asarray(mask_NxN), jnp.clip(rel_BxS, 0, n - 1), axis=1)
  tree_BxNxS = jnp.moveaxis(tree_BxNxS, 1, 0)
  return (rel_BxS < 0)[:, None] | (in_tree_BxS[:, None] & tree_BxNxS)


def node_tokens(root_B: jnp.ndarray, logits_JxBxV: jnp.ndarray, tree: Tree) -> jnp.ndarray:
  """(B, N) tokens of the nodes: the root, then at depth d and rank r the r-th most likely token
  of drafting head d + 1 (logits_JxBxV[d - 1])."""
  tops = [jax.lax.top_k(logits_JxBxV[d], b)[1].astype(jnp.int32)
          for d, b in enumerate(tree.branching)]
  cols = [root_B] + [tops[tree.depth[i] - 1][:, tree.rank[i]] for i in range(1, tree.size)]
  return jnp.stack(cols, axis=1)


def tree_accepts(tokens_BxN: jnp.ndarray, predicted_BxN: jnp.ndarray, tree: Tree
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(deepest accepted node (B,), its depth = accepted drafts (B,)) given the next-token head's
  argmax at every node (greedy verification)."""
  chex.assert_equal_shape([tokens_BxN, predicted_BxN], custom_message="tree_accepts")
  parent_N = np.maximum(np.asarray(tree.parent), 0)
  ok_BxN = (tokens_BxN == predicted_BxN[:, parent_N]).at[:, 0].set(True)
  accepted_BxN = jnp.all(ok_BxN[:, None, :] | ~ancestor_mask(tree)[None], axis=-1)
  depth_N = jnp.asarray(tree.depth, jnp.int32)
  best_B = jnp.argmax(jnp.where(accepted_BxN, depth_N, -1), axis=1).astype(jnp.int32)
  return best_B, depth_N[best_B]


def compact_cache(cache: dict, lengths_B: jnp.ndarray, path_BxA: jnp.ndarray) -> dict:
  """The cache with each row's path nodes (slots length + path[j]) moved to length + j. Every
  K/V array (..., B, K, S, H) of every entry moves; `lengths` is left to the caller."""
  def move(x):
    if x.ndim < 4:
      return x

    def row(x_KxSxH, length, path_A):
      rows_KxAxH = jnp.take(x_KxSxH, length + path_A, axis=1)
      return jax.lax.dynamic_update_slice(x_KxSxH, rows_KxAxH, (0, length, 0))
    f = jax.vmap(row)
    for _ in range(x.ndim - 4):
      f = jax.vmap(f, in_axes=(0, None, None))
    return f(x, lengths_B, path_BxA)
  return {name: entry if name == "lengths" else jax.tree.map(move, entry)
          for name, entry in cache.items()}

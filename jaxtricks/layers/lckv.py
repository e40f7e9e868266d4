"""Layer-Condensed KV cache (Wu & Tu 2024, arXiv 2405.10637): most layers attend to the K/V of
one top layer, so only that layer and a few warm-up layers keep a cache.

Layout (sandwich warm-up, the paper's best): with w warm-up layers on a depth-L trunk, layers
0..w/2-1 and the top w - w/2 layers attend normally; the layers between read the K/V of layer
p = L - 1 - (w - w/2), which reads its own. A layer reading a later layer cannot see its own
token's entry there (that entry depends on it): its diagonal is masked, and token 0 gets a zero
attention output.

Training and prefill (parallel iterative approximation, Section 2.2): the span from the first
layer reading a later layer up to the layer it reads runs m times over the whole sequence, each
time with that layer's K/V from the previous iteration (zeros at first); gradients flow through
the last b iterations only. After j iterations positions 0..j-1 are exact, so a chunk of T <= m
tokens is computed exactly with T iterations, and decoding one token at a time is the exact
sequential computation, reading only the producers' caches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import KV, AttentionConfig, write_cache
from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.models.trunk import run_layers, run_sequential
from jaxtricks.ops.kv_layout import LayerKV, cycle, kv_sources
from jaxtricks.registry import register


def lckv_sources(depth: int, warmup: int) -> tuple[int, ...]:
  """Sandwich layout: warmup // 2 standard layers at the bottom, the rest at the top; the layers
  between read the highest of them that is not a warm-up layer."""
  if not 0 <= warmup < depth:
    raise ValueError(f"warmup={warmup} must be in [0, {depth}): LCKV needs at least one of the "
                     f"{depth} layers to read the top layer")
  bottom = warmup // 2
  top = depth - 1 - (warmup - bottom)
  return tuple(i if i < bottom or i > top else top for i in range(depth))


def zeroed_chunk(entry: dict, t: int, lengths_B: jnp.ndarray) -> KV:
  """A producer's cached K/V with the chunk's T slots zeroed (the first iteration's guess)."""
  b, k, s, h = entry["k"].shape
  zeros_BxTxKxH = jnp.zeros((b, t, k, h), entry["k"].dtype)
  slots_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
  return KV(write_cache(entry["k"], zeros_BxTxKxH, lengths_B),
            write_cache(entry["v"], zeros_BxTxKxH, lengths_B), slots_BxS, head_major=True)


def run_iterative(plan: tuple[LayerKV, ...], blocks: list, x_BxTxD: jnp.ndarray,
                  positions_BxT: jnp.ndarray | None, cache: dict | None, train: bool,
                  iterations: int, grad_iterations: int, kv_shape: tuple[int, int, Any]
                  ) -> tuple[jnp.ndarray, jnp.ndarray, dict | None]:
  """The trunk with layers reading later layers: (output, last block's input, new cache)."""
  span = cycle(plan)
  if span is None:
    return run_sequential(plan, blocks, x_BxTxD, positions_BxT, cache, train)
  low, high = span
  b, t, _ = x_BxTxD.shape
  new_cache = None if cache is None else dict(cache)
  kv_of_layer: dict[int, Any] = {}
  x_BxTxD, _ = run_layers(plan, blocks, range(low), x_BxTxD, positions_BxT, cache, new_cache,
                          train, kv_of_layer)
  read_later = sorted({s.source for s in plan[low:high + 1] if s.masks_diagonal})
  if cache is None:
    k, h, dtype = kv_shape
    zeros = jnp.zeros((b, t, k, h), dtype)
    guess = {p: KV(zeros, zeros, positions_BxT) for p in read_later}
  else:
    lengths_B = cache["lengths"]
    guess = {p: zeroed_chunk(cache[f"layer_{p}"], t, lengths_B) for p in read_later}
  m = min(iterations, t)  # t iterations are already exact
  b_grad = min(grad_iterations, m)
  for it in range(m):
    kv_it = {**kv_of_layer, **guess}
    scratch = None if cache is None else dict(new_cache)
    x_out, z_out = run_layers(plan, blocks, range(low, high + 1), x_BxTxD, positions_BxT, cache,
                              scratch, train, kv_it)
    guess = {p: kv_it[p] for p in read_later}
    if it < m - b_grad:
      guess = jax.lax.stop_gradient(guess)
  kv_of_layer = kv_it
  new_cache = scratch
  x_BxTxD, z_BxTxD = x_out, z_out
  if high + 1 < len(blocks):
    x_BxTxD, z_BxTxD = run_layers(plan, blocks, range(high + 1, len(blocks)), x_BxTxD,
                                  positions_BxT, cache, new_cache, train, kv_of_layer)
  return x_BxTxD, z_BxTxD, new_cache


@register("attention", "lckv")
@dataclasses.dataclass(frozen=True)
class LCKVAttention(AttentionConfig):
  """The `mha` attention with LCKV's layout: `warmup` standard layers (sandwich), or any explicit
  `kv_layout` (layers may read later layers), trained by `iterations` parallel iterations with
  gradients through the last `grad_iterations`."""
  warmup: int = 2
  iterations: int = 7         # m (the paper's default)
  grad_iterations: int = 2    # b
  tree_decoding: ClassVar[bool] = False  # a tree's chunk iterates: not exact beyond m nodes

  def kv_source(self, depth: int) -> tuple[int, ...]:
    if self.kv_layout:
      return kv_sources(depth, 1, self.kv_layout)
    return lckv_sources(depth, self.warmup)

  def validate(self, model: Any) -> None:
    if self.iterations < 1:
      raise ConfigError(f"model.attention.iterations must be >= 1, got {self.iterations}")
    if not 1 <= self.grad_iterations <= self.iterations:
      raise ConfigError(f"model.attention.grad_iterations={self.grad_iterations} must be in "
                        f"[1, model.attention.iterations={self.iterations}]")
    super().validate(model)  # the layout, warmup included (lckv_sources)

  def check_order(self, plan: tuple[LayerKV, ...]) -> None:
    del plan  # any order: the span reading later layers is iterated

  def run_blocks(self, model, blocks, x_BxTxD, positions_BxT, cache, train):
    kv_shape = (self.kv_heads, self.head_size(model.d_model), resolve_dtype(model.dtype))
    return run_iterative(model.kv_plan, blocks, x_BxTxD, positions_BxT, cache, train,
                         self.iterations, self.grad_iterations, kv_shape)

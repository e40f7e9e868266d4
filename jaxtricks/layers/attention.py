"""Self-attention with RoPE, grouped K/V heads, cross-layer K/V sharing, sliding windows and a
KV cache (arXiv 1706.03762, 2104.09864, 2305.13245, 1911.02150, 2405.12981, 2004.05150).

A layer either produces K/V (it has K/V projections) or reuses the K/V of another layer passed
in as `shared_kv` (Cross-Layer Attention: no K/V projections at all); the model's K/V layout
(jaxtricks.ops.kv_layout) says which, per layer. With a cache, new keys (after RoPE) and values
are written at each row's current length and attention reads the cache. A producer with a
sliding window W keeps a ring buffer of R >= W slots instead: token p goes to slot p mod R and
the slot remembers p, so attention masks by the stored positions. New tokens that are the nodes
of a candidate tree (a cache entry `tree`, jaxtricks.ops.tree) see the cached prefix and their
ancestors only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxtricks.errors import ConfigError
from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.layers.linear import Linear
from jaxtricks.models.trunk import run_sequential
from jaxtricks.ops.attention import (
  attention,
  cached_attention,
  causal_mask,
  check_implementation,
)
from jaxtricks.ops.kv_layout import LayerKV, cycle, kv_plan, kv_sources, ring_size
from jaxtricks.ops.rope import apply_rope
from jaxtricks.ops.tree import tree_cache_mask
from jaxtricks.registry import Component, register


@struct.dataclass
class KV:
  """The keys and values a layer attends to, shared with the layers that reuse them (CLA)."""
  k: jnp.ndarray                  # (B, S, K, H), or (B, K, S, H) when head_major
  v: jnp.ndarray
  positions: jnp.ndarray | None   # (B, S) key positions; None: 0..S-1
  head_major: bool = struct.field(pytree_node=False, default=False)
  mask: jnp.ndarray | None = None  # (B, T, S) visibility overriding the causal one (trees)


def write_cache(cache_BxKxSxH: jnp.ndarray, new_BxTxKxH: jnp.ndarray,
                lengths_B: jnp.ndarray) -> jnp.ndarray:
  """Writes each row's new entries at that row's current length (head-major cache)."""
  update = lambda c, x, i: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, i, 0))
  return jax.vmap(update)(cache_BxKxSxH, jnp.swapaxes(new_BxTxKxH, 1, 2), lengths_B)


# The config field behind each implementation option (AttentionConfig.options).
OPTION_FIELDS = {"block_q": "block_size", "block_k": "block_size", "block_size": "hyper_block",
                 "samples": "hyper_samples", "min_seq_len": "hyper_min_len"}
EMPTY_SLOT = -(2 ** 30)  # the stored position of a ring slot never written: outside every window


def ring_update(cache: dict, k_BxTxKxH: jnp.ndarray, v_BxTxKxH: jnp.ndarray,
                positions_BxT: jnp.ndarray) -> tuple[KV, dict]:
  """(K/V to attend to, updated ring cache) for T new tokens at positions_BxT of a sliding-window
  layer: the cached slots (those at positions before the row's length; later ones are rolled-back
  tokens) followed by the new tokens, then the last R new tokens written at slot p mod R. Tokens
  at positions >= cache['limits'] (right padding of a prefill) are attended to but not written."""
  lengths_B = positions_BxT[:, 0]
  r, t = cache["pos"].shape[1], positions_BxT.shape[1]
  old_pos_BxR = jnp.where(cache["pos"] < lengths_B[:, None], cache["pos"], EMPTY_SLOT)
  new_k = jnp.swapaxes(k_BxTxKxH, 1, 2).astype(cache["k"].dtype)
  new_v = jnp.swapaxes(v_BxTxKxH, 1, 2).astype(cache["v"].dtype)
  kv = KV(jnp.concatenate([cache["k"], new_k], axis=2), jnp.concatenate([cache["v"], new_v], 2),
          jnp.concatenate([old_pos_BxR, positions_BxT], axis=1), head_major=True)
  limits_B = cache.get("limits", lengths_B + t)
  n_B = jnp.clip(limits_B - lengths_B, 0, t)[:, None]
  j_T = jnp.arange(t)
  slots_BxT = jnp.where((j_T < n_B) & (j_T >= n_B - r), positions_BxT % r, r)  # r: dropped
  put = jax.vmap(lambda c, x, i: c.at[..., i, :].set(x, mode="drop"))
  new = {"k": put(cache["k"], new_k, slots_BxT), "v": put(cache["v"], new_v, slots_BxT),
         "pos": jax.vmap(lambda c, x, i: c.at[i].set(x, mode="drop"))(cache["pos"],
                                                                      positions_BxT, slots_BxT)}
  return kv, new


class SelfAttention(nn.Module):
  n_heads: int
  n_kv_heads: int
  head_dim: int
  produces_kv: bool = True
  window: int = 0                # sliding window (0: every earlier position)
  masks_diagonal: bool = False   # reads a later layer's K/V (LCKV): its own token is not visible
  n_layers: int = 1
  rope_base: float = 10_000.0
  implementation: str = "naive"
  options: tuple[tuple[str, Any], ...] = ()  # the implementation's settings (ops.attention)
  dtype: str = "float32"
  param_dtype: str = "float32"
  projection: Callable[..., nn.Module] = Linear  # the model's projection kind (dense, N:M, ...)

  @nn.compact
  def __call__(self, xq_BxTxD: jnp.ndarray, xkv_BxTxD: jnp.ndarray,
               positions_BxT: jnp.ndarray | None, shared_kv: KV | None = None,
               cache: dict | None = None, train: bool = False
               ) -> tuple[jnp.ndarray, KV, dict | None]:
    """Returns (output (B, T, D), the K/V this layer attended to, its updated cache or None).

    positions None means every row is at 0..T-1 (training): static RoPE tables and causal mask.
    """
    del train  # no train-only behaviour
    if cache is not None and positions_BxT is None:
      raise ValueError("decoding with a cache needs the positions of the new tokens")
    d = xq_BxTxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, k, h = self.n_heads, self.n_kv_heads, self.head_dim
    Linear = self.projection  # noqa: N806
    q_BxTxNxH = Linear((n, h), ("embed", "heads", "head_dim"), std=d ** -0.5, name="q",
                       **kw)(xq_BxTxD)
    q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, self.rope_base)
    if self.produces_kv:
      k_BxTxKxH = Linear((k, h), ("embed", "kv_heads", "head_dim"), std=d ** -0.5, name="k",
                         **kw)(xkv_BxTxD)
      v_BxTxKxH = Linear((k, h), ("embed", "kv_heads", "head_dim"), std=d ** -0.5, name="v",
                         **kw)(xkv_BxTxD)
      k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, self.rope_base)
      if cache is None:
        kv = KV(k_BxTxKxH, v_BxTxKxH, positions_BxT)
      elif "pos" in cache:
        if "tree" in cache:
          raise ValueError("tree decoding needs a full KV cache; sliding-window layers keep a "
                           "ring buffer")
        kv, cache = ring_update(cache, k_BxTxKxH, v_BxTxKxH, positions_BxT)
      else:
        lengths_B = positions_BxT[:, 0]
        tree = cache.get("tree")
        cache = {"k": write_cache(cache["k"], k_BxTxKxH, lengths_B),
                 "v": write_cache(cache["v"], v_BxTxKxH, lengths_B)}
        b, _, s, _ = cache["k"].shape
        slots_BxS = jnp.broadcast_to(jnp.arange(s), (b, s))
        # Tree nodes: node i at slot length + i, its position at its depth (no causal order).
        mask = None if tree is None else tree_cache_mask(lengths_B, s, tree["mask"])
        kv = KV(cache["k"], cache["v"], slots_BxS, head_major=True, mask=mask)
    else:
      if shared_kv is None:
        raise ValueError("a layer without K/V projections needs the K/V of its source layer")
      kv = shared_kv
    static = positions_BxT is None and kv.positions is None
    if not static and (positions_BxT is None or kv.positions is None):
      raise ValueError("queries and shared keys must both have positions or both be 0..T-1")
    window, strict = self.window, self.masks_diagonal
    if kv.mask is not None:  # set by the producer (tree decoding); CLA readers share it
      mask_BxTxS = kv.mask
    else:
      mask_BxTxS = None if static else causal_mask(positions_BxT, kv.positions, window, strict)
    dtype = q_BxTxNxH.dtype
    if kv.head_major:
      out_BxTxNxH = cached_attention(q_BxTxNxH, kv.k.astype(dtype), kv.v.astype(dtype),
                                     mask_BxTxS, zero_empty=strict)
    elif static:
      try:
        out_BxTxNxH = attention(q_BxTxNxH, kv.k.astype(dtype), kv.v.astype(dtype), None,
                                self.implementation, causal=True, window=window, strict=strict,
                                options=dict(self.options))
      except ConfigError as e:  # the op names its arguments; say the config's fields too
        fields = ", ".join(dict.fromkeys(f"model.attention.{OPTION_FIELDS[k]}={v}"
                                         for k, v in self.options if k in OPTION_FIELDS))
        raise ConfigError(f"{fields}: {e}") from None
    else:
      out_BxTxNxH = attention(q_BxTxNxH, kv.k.astype(dtype), kv.v.astype(dtype), mask_BxTxS,
                              self.implementation)
      if strict:  # no visible key: zero output
        out_BxTxNxH = jnp.where(jnp.any(mask_BxTxS, -1)[..., None, None], out_BxTxNxH, 0)
    return output_projection(Linear, out_BxTxNxH, d, self.n_layers, **kw), kv, cache


def output_projection(projection: Callable[..., nn.Module], out_BxTxNxH: jnp.ndarray, d: int,
                      n_layers: int, **kw) -> jnp.ndarray:
  """The heads' outputs projected back to the width by the `o` projection (called inside an
  attention module's compact method), initialised at std 1/sqrt(2 N H L)."""
  _, _, n, h = out_BxTxNxH.shape
  std = (n * h * 2 * n_layers) ** -0.5
  return projection((d,), ("heads", "head_dim", "embed"), in_ndim=2, std=std, name="o",
                    **kw)(out_BxTxNxH)


@register("attention", "mha")
@dataclasses.dataclass(frozen=True)
class AttentionConfig(Component):
  """RoPE self-attention with n_kv_heads K/V heads (MHA, GQA, MQA), Cross-Layer Attention (layer
  i attends with the K/V of layer kv_source[i], from `kv_sharing` or an explicit `kv_layout`)
  and sliding windows (`window` on `window_layers`, every layer when empty). Layouts where a
  layer reads a later layer's K/V are the `lckv` kind's (jaxtricks.layers.lckv)."""
  n_heads: int = 4
  n_kv_heads: int = 0            # 0 means n_heads (multi-head attention)
  head_dim: int = 0              # 0 means d_model // n_heads
  rope_base: float = 10_000.0
  kv_sharing: int = 1            # CLA factor: CLA2 = 2 layers share one K/V
  kv_layout: tuple[int, ...] = ()  # explicit kv_source per layer (wins over kv_sharing)
  window: int = 0                # sliding-window size (0: global attention)
  window_layers: tuple[int, ...] = ()  # the layers with the window (empty: all, if window > 0)
  impl: str = "naive"            # naive | xla | cudnn (jax.nn.dot_product_attention) | ring |
                                 # blockwise (exact, O(T) memory) | hyper (HyperAttention)
  block_size: int = 512          # blockwise: query and key block
  hyper_layers: tuple[int, ...] = ()  # layers running HyperAttention whatever `impl` (patching)
  hyper_block: int = 256         # HyperAttention: sorted block size b
  hyper_samples: int = 256       # HyperAttention: sampled key columns m (0: none)
  hyper_min_len: int = 4096      # HyperAttention: exact causal attention at or below this length
  hyper_seed: int = 0            # HyperAttention: LSH directions and samples (plus the layer)
  tree_decoding: ClassVar[bool] = True  # decodes a candidate tree in one pass (no window)
  # A decoding call may continue a row from a shorter length than its cache holds (the rejected
  # drafts of speculative decoding are overwritten): true of caches indexed by position.
  rewinds: ClassVar[bool] = True

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  def head_size(self, d_model: int) -> int:
    return self.head_dim or d_model // self.n_heads

  def kv_source(self, depth: int) -> tuple[int, ...]:
    return kv_sources(depth, self.kv_sharing, self.kv_layout)

  def kv_plan(self, depth: int) -> tuple[LayerKV, ...]:
    """One LayerKV per trunk block (jaxtricks.ops.kv_layout)."""
    return kv_plan(self.kv_source(depth), self.window, self.window_layers)

  def validate(self, model: Any) -> None:
    self.check_heads(model)
    try:
      plan = self.kv_plan(model.depth)
      check_implementation(self.impl)
    except ValueError as e:
      raise ConfigError(f"model.attention: {e}") from None
    if self.head_size(model.d_model) % 2:
      raise ConfigError(f"RoPE needs an even head dimension, got {self.head_size(model.d_model)}")
    self.check_order(plan)
    for name in ("block_size", "hyper_block", "hyper_min_len"):
      if getattr(self, name) < 1:
        raise ConfigError(f"model.attention.{name} must be >= 1, got {getattr(self, name)}")
    if self.hyper_samples < 0:
      raise ConfigError(f"model.attention.hyper_samples must be >= 0, got {self.hyper_samples}")
    for i in self.hyper_layers:
      if not 0 <= i < model.depth:
        raise ConfigError(f"model.attention.hyper_layers names layer {i}, outside the model's "
                          f"{model.depth} layers")
    for spec in plan:
      if self.implementation(spec) == "hyper" and (spec.window or spec.masks_diagonal):
        raise ConfigError(f"model.attention: HyperAttention in layer {spec.layer} approximates "
                          f"plain causal attention; that layer has a sliding window or reads a "
                          f"later layer")

  def check_heads(self, model: Any) -> None:
    """n_heads, n_kv_heads and the width agree (every attention kind's first check)."""
    if self.n_heads < 1:
      raise ConfigError(f"model.attention.n_heads must be >= 1, got {self.n_heads}")
    if not self.head_dim and model.d_model % self.n_heads:
      raise ConfigError(f"model.attention.n_heads={self.n_heads} does not divide "
                        f"model.d_model={model.d_model}")
    if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
      raise ConfigError(f"model.attention.n_kv_heads={self.kv_heads} does not divide "
                        f"model.attention.n_heads={self.n_heads}")

  def implementation(self, spec: LayerKV) -> str:
    return "hyper" if spec.layer in self.hyper_layers else self.impl

  def options(self, spec: LayerKV) -> tuple[tuple[str, Any], ...]:
    impl = self.implementation(spec)
    if impl == "blockwise":
      return (("block_q", self.block_size), ("block_k", self.block_size))
    if impl == "hyper":
      return (("block_size", self.hyper_block), ("samples", self.hyper_samples),
              ("min_seq_len", self.hyper_min_len), ("seed", self.hyper_seed + spec.layer))
    return ()

  def check_order(self, plan: tuple[LayerKV, ...]) -> None:
    """Blocks run bottom to top here, so no layer may read a later layer's K/V."""
    if cycle(plan):
      spec = next(s for s in plan if s.masks_diagonal)
      raise ConfigError(f"model.attention.kv_layout: layer {spec.layer} reads the later layer "
                        f"{spec.source}; such layouts train iteratively: use "
                        f"--model.attention=lckv")

  def build(self, model: Any, spec: LayerKV, projection: Callable) -> nn.Module:
    return SelfAttention(self.n_heads, self.kv_heads, self.head_size(model.d_model),
                         produces_kv=spec.produces, window=spec.window,
                         masks_diagonal=spec.masks_diagonal, n_layers=model.n_layers,
                         rope_base=self.rope_base, implementation=self.implementation(spec),
                         options=self.options(spec), dtype=model.dtype,
                         param_dtype=model.param_dtype, projection=projection, name="attn")

  def run_blocks(self, model: Any, blocks: list, x_BxTxD: jnp.ndarray,
                 positions_BxT: jnp.ndarray | None, cache: dict | None, train: bool
                 ) -> tuple[jnp.ndarray, jnp.ndarray, dict | None]:
    """Runs the trunk's blocks: (output, the last block's input, updated cache or None)."""
    return run_sequential(model.kv_plan, blocks, x_BxTxD, positions_BxT, cache, train)

  def kv_cache(self, model: Any, batch: int, max_len: int, window: int = 0,
               chunk: int = 1) -> dict:
    """One layer's zeroed K/V cache, head-major (B, K, S, H): see ops.attention. With a sliding
    window, a ring buffer of `ring_size` slots and the position each slot holds."""
    slots = ring_size(window, max_len, chunk) if window else max_len
    shape = (batch, self.kv_heads, slots, self.head_size(model.d_model))
    dtype = resolve_dtype(model.dtype)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if window:
      cache["pos"] = jnp.full((batch, slots), EMPTY_SLOT, jnp.int32)
    return cache

  def cache_entries(self, model: Any, batch: int, max_len: int, mtp_heads: int) -> dict:
    return {f"layer_{s.layer}": self.kv_cache(model, batch, max_len, s.window, mtp_heads)
            for s in model.kv_plan if s.produces}

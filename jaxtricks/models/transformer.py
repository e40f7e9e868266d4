"""Decoder-only Transformer LM: embedding, pre-norm blocks (RMSNorm, RoPE self-attention, SwiGLU),
final RMSNorm and an untied unembedding (Vaswani et al. 2017, arXiv 1706.03762; LLaMA-style
choices of Touvron et al. 2023, arXiv 2302.13971).

The attention, MLP and output head are chosen by name from `jaxtricks.models.registry`. K/V heads
(MHA/GQA/MQA) and Cross-Layer Attention (arXiv 2405.12981) are config fields: layer i attends with
the K/V of layer `kv_source[i]`, and only producing layers have K/V projections and a KV cache.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import SelfAttention
from jaxtricks.layers.dtypes import DTYPES
from jaxtricks.layers.embed import Embed, LinearHead
from jaxtricks.layers.mlp import SwiGLU
from jaxtricks.layers.norm import RMSNorm
from jaxtricks.models import registry
from jaxtricks.ops.attention import IMPLEMENTATIONS, kv_sources


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0          # 0 means n_heads (multi-head attention)
  head_dim: int = 0            # 0 means d_model // n_heads
  d_ff: int = 0                # 0 means 8/3 d_model rounded up to a multiple of 32
  max_len: int = 0             # 0 means unbounded (RoPE needs no table)
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  kv_sharing: int = 1          # Cross-Layer Attention factor: CLA2 = 2 layers share one K/V
  kv_layout: tuple[int, ...] = ()  # explicit kv_source per layer (wins over kv_sharing)
  attention: str = "mha"
  attn_impl: str = "naive"     # naive | xla | cudnn (jax.nn.dot_product_attention)
  mlp: str = "swiglu"
  head: str = "linear"
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  remat: bool = False          # recompute each block in the backward pass to save memory

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def kv_source(self) -> tuple[int, ...]:
    return kv_sources(self.n_layers, self.kv_sharing, self.kv_layout)

  @property
  def kv_producers(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.kv_source)))

  @property
  def cross_layer(self) -> bool:
    return len(self.kv_producers) < self.n_layers

  @property
  def ff_dim(self) -> int:
    return self.d_ff or -(-8 * self.d_model // 3 // 32) * 32

  def validate(self) -> None:
    positive = ("vocab_size", "d_model", "n_layers", "n_heads")
    for name in positive:
      if getattr(self, name) < 1:
        raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if not self.head_dim and self.d_model % self.n_heads:
      raise ConfigError(f"model.n_heads={self.n_heads} does not divide "
                        f"model.d_model={self.d_model}")
    if self.n_heads % self.kv_heads:
      raise ConfigError(f"model.n_kv_heads={self.kv_heads} does not divide "
                        f"model.n_heads={self.n_heads}")
    if not 1 <= self.kv_sharing <= self.n_layers:
      raise ConfigError(f"model.kv_sharing={self.kv_sharing} must be between 1 and "
                        f"model.n_layers={self.n_layers}")
    try:
      kv_sources(self.n_layers, self.kv_sharing, self.kv_layout)
    except ValueError as e:
      raise ConfigError(f"model.kv_layout: {e}") from None
    if self.attn_impl not in IMPLEMENTATIONS:
      raise ConfigError(f"model.attn_impl={self.attn_impl!r} is unknown; valid: "
                        f"{', '.join(IMPLEMENTATIONS)}")
    if self.dim_per_head % 2:
      raise ConfigError(f"RoPE needs an even head dimension, got {self.dim_per_head}")
    for name, table in (("attention", registry.ATTENTION), ("mlp", registry.MLP),
                        ("head", registry.HEAD)):
      if getattr(self, name) not in table:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; valid: "
                          f"{', '.join(sorted(table))}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; valid: "
                          f"{', '.join(DTYPES)}")


@registry.register(registry.ATTENTION, "mha")
def _mha(cfg: ModelConfig, layer: int) -> nn.Module:
  return SelfAttention(cfg.n_heads, cfg.kv_heads, cfg.dim_per_head,
                       produces_kv=cfg.kv_source[layer] == layer, n_layers=cfg.n_layers,
                       rope_base=cfg.rope_base, implementation=cfg.attn_impl, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, name="attn")


@registry.register(registry.MLP, "swiglu")
def _swiglu(cfg: ModelConfig, layer: int) -> nn.Module:
  return SwiGLU(cfg.ff_dim, n_layers=cfg.n_layers, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                name="mlp")


@registry.register(registry.HEAD, "linear")
def _linear_head(cfg: ModelConfig) -> nn.Module:
  return LinearHead(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head")


class Block(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)). In a cross-layer-attention model a K/V-producing
  layer normalises its K/V input with a norm of its own (`kv_norm`), as in the CLA paper."""
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, shared_kv=None, cache=None):
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    hq = RMSNorm(name="attn_norm", **norm)(x_BxTxD)
    produces = cfg.kv_source[self.layer] == self.layer
    hkv = RMSNorm(name="kv_norm", **norm)(x_BxTxD) if produces and cfg.cross_layer else hq
    attn = registry.ATTENTION[cfg.attention](cfg, self.layer)
    out_BxTxD, kv, cache = attn(hq, hkv, positions_BxT, shared_kv, cache)
    x_BxTxD = x_BxTxD + out_BxTxD
    h = RMSNorm(name="mlp_norm", **norm)(x_BxTxD)
    return x_BxTxD + registry.MLP[cfg.mlp](cfg, self.layer)(h), kv, cache


class Transformer(nn.Module):
  """tokens (B, T) int -> logits (B, T, V).

  With `cache` (see jaxtricks.decode.init_cache) the tokens continue each row from its cached
  length, and (logits, updated cache) is returned. `hidden()` gives the final-normed trunk output.
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    block = nn.remat(Block) if cfg.remat else Block
    self.blocks = [block(cfg, i, name=f"block_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.head = registry.HEAD[cfg.head](cfg)

  def hidden(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
             cache: dict | None = None):
    """Final-normed hidden states (B, T, D), and the updated cache when one is given."""
    # Without a cache and positions, every row is at 0..T-1 (static RoPE tables and mask).
    if cache is not None:
      positions_BxT = cache["lengths"][:, None] + jnp.arange(tokens_BxT.shape[1])
    x_BxTxD = self.embed(tokens_BxT)
    kv_of_layer = {}
    new_cache = {}
    for i, block in enumerate(self.blocks):
      src = self.config.kv_source[i]
      layer_cache = cache[f"layer_{i}"] if cache is not None and src == i else None
      x_BxTxD, kv, layer_cache = block(x_BxTxD, positions_BxT, kv_of_layer.get(src), layer_cache)
      if src == i:
        kv_of_layer[i] = kv
        if cache is not None:
          new_cache[f"layer_{i}"] = layer_cache
    x_BxTxD = self.final_norm(x_BxTxD)
    if cache is None:
      return x_BxTxD
    new_cache["lengths"] = cache["lengths"] + tokens_BxT.shape[1]
    return x_BxTxD, new_cache

  def logits(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
    return self.head(x_BxTxD).astype(jnp.float32)

  def __call__(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
               cache: dict | None = None):
    if cache is None:
      return self.logits(self.hidden(tokens_BxT, positions_BxT))
    x_BxTxD, cache = self.hidden(tokens_BxT, cache=cache)
    return self.logits(x_BxTxD), cache

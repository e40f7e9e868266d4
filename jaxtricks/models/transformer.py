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
from jaxtricks.layers.kan import KANFeedForward
from jaxtricks.layers.linear import Linear
from jaxtricks.layers.mlp import SwiGLU
from jaxtricks.layers.mtp import ResidualLinearHead
from jaxtricks.layers.norm import RMSNorm
from jaxtricks.layers.sparse_linear import METHODS, NMSpec
from jaxtricks.models import registry
from jaxtricks.ops.attention import IMPLEMENTATIONS, kv_sources

MTP_HEADS = ("transformer", "linear", "sequential")


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
  mlp: str = "swiglu"           # swiglu | kan (two KAN layers, d -> d_ff or d_model -> d)
  kan_grid: int = 5            # mlp='kan': B-spline intervals, order and knot range
  kan_order: int = 3
  kan_range: float = 3.0
  head: str = "linear"
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  remat: bool = False          # recompute each block in the backward pass to save memory
  # Multi-token prediction (arXiv 2404.19737): head i predicts token t+i, i = 1..mtp_heads.
  mtp_heads: int = 1           # 1: an ordinary next-token LM
  mtp_head: str = "transformer"  # transformer (parallel layers) | linear | sequential (DeepSeek-V3)
  mtp_compute_matched: bool = False  # remove mtp_heads - 1 trunk layers
  mtp_lambda: float = 0.0      # 0: every head weighs 1; else heads 2..n weigh lambda / (n - 1)
  # N:M sparse projections: SLoPe (arXiv 2405.16325) or the SR-STE baseline (arXiv 2102.04010).
  # The embedding and the output head always stay dense.
  sparsity: str = "none"       # none | slope | srste
  sparse_n: int = 2
  sparse_m: int = 4
  sparse_blocks: tuple[str, ...] = ()  # per block "N:M" or "dense"; () = sparse_n:sparse_m
  sparse_targets: tuple[str, ...] = ("attn", "mlp")
  sparse_rescale: bool = False  # scale kept weights by M/N
  srste_decay: float = 2e-4    # SR-STE's lambda_w
  sparse_backward: str = "double"  # slope: double (pruned input gradient) | exact (ablation)
  mask_change_freq: int = 1    # slope: recompute the transposed mask every k steps (1: each step)
  adapter_rank: int = 0        # SLoPe lazy low-rank adapters (0: none) on every pruned linear
  adapter_start: float = 0.99  # fraction of train.steps after which the adapters train

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def depth(self) -> int:
    """Blocks on the next-token path (n_layers, less mtp_heads - 1 when compute-matched)."""
    return self.n_layers - (self.mtp_heads - 1 if self.mtp_compute_matched else 0)

  @property
  def kv_source(self) -> tuple[int, ...]:
    return kv_sources(self.depth, self.kv_sharing, self.kv_layout)

  @property
  def mtp_cache_heads(self) -> tuple[int, ...]:
    """Indices i of the extra heads `mtp_i` (predicting token t + i + 1) with a KV cache."""
    return tuple(range(1, self.mtp_heads)) if self.mtp_head == "transformer" else ()

  @property
  def kv_producers(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.kv_source)))

  @property
  def cross_layer(self) -> bool:
    return len(self.kv_producers) < self.n_layers

  def block_nm(self, layer: int) -> tuple[int, int] | None:
    """(N, M) of block `layer`'s pruned projections, or None when it is dense."""
    if self.sparsity == "none":
      return None
    if not self.sparse_blocks:
      return self.sparse_n, self.sparse_m
    entry = self.sparse_blocks[layer].strip().lower()
    if entry == "dense":
      return None
    try:
      n, m = (int(v) for v in entry.split(":"))
    except ValueError:
      raise ConfigError(f"model.sparse_blocks[{layer}]={entry!r} is not 'N:M' or 'dense'"
                        ) from None
    return n, m

  def sparsity_spec(self, layer: int, target: str) -> NMSpec | None:
    """The NMSpec of block `layer`'s `target` ('attn' or 'mlp') projections, None if dense."""
    nm = self.block_nm(layer)
    if nm is None or target not in self.sparse_targets:
      return None
    return NMSpec(nm[0], nm[1], self.sparsity, self.sparse_rescale, self.srste_decay,
                  self.adapter_rank, double_prune=self.sparse_backward == "double",
                  mask_change_freq=self.mask_change_freq)

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
    if self.mtp_heads < 1 or self.mtp_head not in MTP_HEADS:
      raise ConfigError(f"model.mtp_heads={self.mtp_heads} must be >= 1 and model.mtp_head="
                        f"{self.mtp_head!r} one of {', '.join(MTP_HEADS)}")
    if self.depth < 1:
      raise ConfigError(f"model.mtp_compute_matched removes {self.mtp_heads - 1} of "
                        f"model.n_layers={self.n_layers} layers: nothing is left")
    if self.mtp_lambda < 0:
      raise ConfigError(f"model.mtp_lambda must be >= 0, got {self.mtp_lambda}")
    if not 1 <= self.kv_sharing <= self.depth:
      raise ConfigError(f"model.kv_sharing={self.kv_sharing} must be between 1 and the depth "
                        f"{self.depth}")
    try:
      kv_sources(self.depth, self.kv_sharing, self.kv_layout)
    except ValueError as e:
      raise ConfigError(f"model.kv_layout: {e}") from None
    if self.attn_impl not in IMPLEMENTATIONS:
      raise ConfigError(f"model.attn_impl={self.attn_impl!r} is unknown; valid: "
                        f"{', '.join(IMPLEMENTATIONS)}")
    if self.dim_per_head % 2:
      raise ConfigError(f"RoPE needs an even head dimension, got {self.dim_per_head}")
    if self.kan_grid < 1 or self.kan_order < 0 or self.kan_range <= 0:
      raise ConfigError(f"model.kan_grid={self.kan_grid} must be >= 1, model.kan_order="
                        f"{self.kan_order} >= 0 and model.kan_range={self.kan_range} > 0")
    for name, table in (("attention", registry.ATTENTION), ("mlp", registry.MLP),
                        ("head", registry.HEAD)):
      if getattr(self, name) not in table:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; valid: "
                          f"{', '.join(sorted(table))}")
    self._validate_sparsity()
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; valid: "
                          f"{', '.join(DTYPES)}")


  def _validate_sparsity(self) -> None:
    if self.sparsity not in ("none", *METHODS):
      raise ConfigError(f"model.sparsity={self.sparsity!r} is unknown; valid: none, "
                        f"{', '.join(METHODS)}")
    if self.sparsity == "none":
      return
    if self.mask_change_freq < 1:
      raise ConfigError(f"model.mask_change_freq must be >= 1, got {self.mask_change_freq}")
    if self.sparse_backward not in ("double", "exact"):
      raise ConfigError(f"model.sparse_backward={self.sparse_backward!r} is unknown; valid: "
                        "double, exact")
    if self.sparse_blocks and len(self.sparse_blocks) != self.depth:
      raise ConfigError(f"model.sparse_blocks has {len(self.sparse_blocks)} entries for "
                        f"{self.depth} blocks")
    unknown = set(self.sparse_targets) - {"attn", "mlp"}
    if unknown or not self.sparse_targets:
      raise ConfigError(f"model.sparse_targets={self.sparse_targets} must be a non-empty "
                        "subset of attn, mlp")
    if "mlp" in self.sparse_targets and self.mlp != "swiglu":
      raise ConfigError(f"model.sparse_targets includes 'mlp' but model.mlp={self.mlp!r} has no "
                        "linear projections to prune; use --model.sparse_targets=attn")
    if self.adapter_rank < 0 or not 0 <= self.adapter_start <= 1:
      raise ConfigError(f"model.adapter_rank={self.adapter_rank} must be >= 0 and "
                        f"model.adapter_start={self.adapter_start} within [0, 1]")
    dims = {"model.d_model": self.d_model, "the head dimension": self.dim_per_head,
            "the MLP width": self.ff_dim}
    for layer in range(self.depth):
      nm = self.block_nm(layer)
      if nm is None:
        continue
      n, m = nm
      where = "model.sparse_n/sparse_m" if not self.sparse_blocks else "model.sparse_blocks"
      if not 0 < n <= m or m > 16:
        raise ConfigError(f"{where}: N:M sparsity needs 0 < N <= M <= 16, got "
                          f"model.sparse_n={n}, model.sparse_m={m}")
      for what, size in dims.items():
        if size % m:
          raise ConfigError(f"{what}={size} is not divisible by the N:M group size M={m}")


@registry.register(registry.ATTENTION, "mha")
def _mha(cfg: ModelConfig, layer: int, produces_kv: bool) -> nn.Module:
  return SelfAttention(cfg.n_heads, cfg.kv_heads, cfg.dim_per_head,
                       produces_kv=produces_kv, n_layers=cfg.n_layers,
                       rope_base=cfg.rope_base, implementation=cfg.attn_impl, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, sparsity=cfg.sparsity_spec(layer, "attn"),
                       name="attn")


@registry.register(registry.MLP, "swiglu")
def _swiglu(cfg: ModelConfig, layer: int) -> nn.Module:
  return SwiGLU(cfg.ff_dim, n_layers=cfg.n_layers, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                sparsity=cfg.sparsity_spec(layer, "mlp"), name="mlp")


@registry.register(registry.MLP, "kan")
def _kan_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
  return KANFeedForward(cfg.d_ff or cfg.d_model, cfg.kan_grid, cfg.kan_order, cfg.kan_range,
                        n_layers=cfg.n_layers, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        name="mlp")


@registry.register(registry.HEAD, "linear")
def _linear_head(cfg: ModelConfig) -> nn.Module:
  return LinearHead(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head")


class Block(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)). In a cross-layer-attention model a K/V-producing
  layer normalises its K/V input with a norm of its own (`kv_norm`), as in the CLA paper.
  `own_kv` makes the block produce its K/V whatever the layout (multi-token heads)."""
  config: ModelConfig
  layer: int
  own_kv: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, shared_kv=None, cache=None):
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    hq = RMSNorm(name="attn_norm", **norm)(x_BxTxD)
    produces = self.own_kv or cfg.kv_source[self.layer] == self.layer
    cla = cfg.cross_layer and not self.own_kv
    hkv = RMSNorm(name="kv_norm", **norm)(x_BxTxD) if produces and cla else hq
    attn = registry.ATTENTION[cfg.attention](cfg, self.layer, produces)
    out_BxTxD, kv, cache = attn(hq, hkv, positions_BxT, shared_kv, cache)
    x_BxTxD = x_BxTxD + out_BxTxD
    h = RMSNorm(name="mlp_norm", **norm)(x_BxTxD)
    return x_BxTxD + registry.MLP[cfg.mlp](cfg, self.layer)(h), kv, cache


class SequentialModule(nn.Module):
  """DeepSeek-V3 multi-token module (arXiv 2412.19437, eq. 21-22): a block over
  W [RMSNorm(h_prev); RMSNorm(Emb(token t + k))], W a 2D -> D projection."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h_prev_BxTxD, emb_BxTxD, positions_BxT):
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    both_BxTx2xD = jnp.stack([RMSNorm(name="h_norm", **norm)(h_prev_BxTxD),
                              RMSNorm(name="emb_norm", **norm)(emb_BxTxD)], axis=-2)
    x_BxTxD = Linear((cfg.d_model,), ("mtp_in", "embed", "embed_out"), in_ndim=2, name="proj",
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype)(both_BxTx2xD)
    block = nn.remat(Block) if cfg.remat else Block
    return block(cfg, cfg.depth - 1, own_kv=True, name="block")(x_BxTxD, positions_BxT)[0]


class Transformer(nn.Module):
  """tokens (B, T) int -> logits (B, T, V) of the next token.

  With `cache` (see jaxtricks.decode.init_cache) the tokens continue each row from its cached
  length, and (logits, updated cache) is returned. `hidden()` gives the final-normed trunk output.
  With mtp_heads = n > 1, `heads_hidden()` gives the n heads' states (head 1 is the next-token
  path, so a model stripped of heads 2..n is an ordinary LM) and `project()` maps a state to
  logits through the shared final norm and unembedding.
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    block = nn.remat(Block) if cfg.remat else Block
    self.blocks = [block(cfg, i, name=f"block_{i}") for i in range(cfg.depth)]
    self.final_norm = RMSNorm(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.head = registry.HEAD[cfg.head](cfg)
    extra = range(1, cfg.mtp_heads)
    if cfg.mtp_head == "transformer":
      self.mtp = [block(cfg, cfg.depth - 1, own_kv=True, name=f"mtp_{i}") for i in extra]
    elif cfg.mtp_head == "linear":
      self.mtp = [ResidualLinearHead(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     name=f"mtp_{i}") for i in extra]
    else:
      self.mtp = [SequentialModule(cfg, name=f"mtp_{i}") for i in extra]

  def _trunk(self, tokens_BxT, positions_BxT, cache):
    """(output of the last block, input of the last block, updated cache), states pre-norm."""
    if cache is not None:
      positions_BxT = cache["lengths"][:, None] + jnp.arange(tokens_BxT.shape[1])
    # Without a cache and positions, every row is at 0..T-1 (static RoPE tables and mask).
    x_BxTxD = self.embed(tokens_BxT)
    kv_of_layer = {}
    new_cache = None if cache is None else dict(cache)
    z_BxTxD = x_BxTxD
    for i, block in enumerate(self.blocks):
      src = self.config.kv_source[i]
      layer_cache = cache[f"layer_{i}"] if cache is not None and src == i else None
      z_BxTxD = x_BxTxD
      x_BxTxD, kv, layer_cache = block(x_BxTxD, positions_BxT, kv_of_layer.get(src), layer_cache)
      if src == i:
        kv_of_layer[i] = kv
        if cache is not None:
          new_cache[f"layer_{i}"] = layer_cache
    if cache is not None:
      new_cache["lengths"] = cache["lengths"] + tokens_BxT.shape[1]
    return x_BxTxD, z_BxTxD, positions_BxT, new_cache

  def hidden(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
             cache: dict | None = None):
    """Final-normed hidden states (B, T, D), and the updated cache when one is given."""
    x_BxTxD, _, _, new_cache = self._trunk(tokens_BxT, positions_BxT, cache)
    x_BxTxD = self.final_norm(x_BxTxD)
    return x_BxTxD if cache is None else (x_BxTxD, new_cache)

  def heads_hidden(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
                   cache: dict | None = None, n_heads: int | None = None):
    """Pre-norm states (n, B, T, D) of heads 1..n (n = n_heads or all), and the cache if given.

    Head i at position t predicts token t + i. Transformer heads are parallel layers on the input
    of the last block; linear heads map the trunk output; sequential modules (DeepSeek-V3) chain:
    module i reads module i-1's state and the embedding of token t + i - 1.
    """
    cfg = self.config
    n = cfg.mtp_heads if n_heads is None else n_heads
    x_BxTxD, z_BxTxD, positions_BxT, new_cache = self._trunk(tokens_BxT, positions_BxT, cache)
    states = [x_BxTxD]
    for i, head in enumerate(self.mtp[:n - 1], start=1):
      if cfg.mtp_head == "transformer":
        head_cache = None if cache is None else cache[f"mtp_{i}"]
        h_BxTxD, _, head_cache = head(z_BxTxD, positions_BxT, None, head_cache)
        if cache is not None:
          new_cache[f"mtp_{i}"] = head_cache
      elif cfg.mtp_head == "linear":
        h_BxTxD = head(x_BxTxD)
      else:
        if cache is not None:
          raise ValueError("sequential multi-token modules do not decode with a KV cache")
        # Token t + i feeds module i at position t; past the end: token 0 (its target is masked).
        shifted_BxT = jnp.pad(tokens_BxT[:, i:], ((0, 0), (0, i)))
        h_BxTxD = head(states[-1], self.embed(shifted_BxT), positions_BxT)
      states.append(h_BxTxD)
    h_NxBxTxD = jnp.stack(states)
    return h_NxBxTxD if cache is None else (h_NxBxTxD, new_cache)

  def project(self, h_BxTxD: jnp.ndarray) -> jnp.ndarray:
    """Logits of a pre-norm state through the shared final norm and unembedding."""
    return self.logits(self.final_norm(h_BxTxD))

  def logits(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
    return self.head(x_BxTxD).astype(jnp.float32)

  def __call__(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
               cache: dict | None = None):
    if self.is_initializing() and self.config.mtp_heads > 1:
      self.heads_hidden(tokens_BxT, positions_BxT)  # creates the extra heads' parameters
    if cache is None:
      return self.logits(self.hidden(tokens_BxT, positions_BxT))
    x_BxTxD, cache = self.hidden(tokens_BxT, cache=cache)
    return self.logits(x_BxTxD), cache

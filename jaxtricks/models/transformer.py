"""Decoder-only Transformer LM: embedding, pre-norm blocks (norm, self-attention, MLP), final
norm and an untied unembedding (Vaswani et al. 2017, arXiv 1706.03762; LLaMA-style choices of
Touvron et al. 2023, arXiv 2302.13971).

Every part is the component of its slot in `ModelConfig` (jaxtricks.models.config): the
embedding, the attention (which also gives the K/V layout, `kv_plan`: layer i attends with the
K/V of layer `kv_source[i]`, only producing layers have K/V projections and a KV cache, and the
attention component runs the blocks in the order its layout needs), the MLP, the output head,
the multi-token heads, the kind of every linear projection and the norm of every norm site
(RMSNorm by default). This file builds them through their configs and never names a kind.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.layers.mtp import Trunk
from jaxtricks.models.config import ModelConfig
from jaxtricks.ops.kv_layout import LayerKV

__all__ = ["Block", "ModelConfig", "Transformer"]


class Block(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)). In a cross-layer-attention model a K/V-producing
  layer normalises its K/V input with a norm of its own (`kv_norm`), as in the CLA paper.
  `own_kv` makes the block produce its K/V whatever the layout (multi-token heads)."""
  config: ModelConfig
  layer: int
  own_kv: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, shared_kv=None, cache=None, train: bool = False):
    cfg = self.config
    hq = cfg.norm.build(cfg, name="attn_norm")(x_BxTxD, train=train)
    spec = LayerKV(self.layer, self.layer) if self.own_kv else cfg.kv_plan[self.layer]
    cla = cfg.cross_layer and not self.own_kv
    if spec.produces and cla:
      hkv = cfg.norm.build(cfg, name="kv_norm")(x_BxTxD, train=train)
    else:
      hkv = hq
    attn = cfg.attention.build(cfg, spec, cfg.projection.factory(cfg, self.layer, "attn"))
    out_BxTxD, kv, cache = attn(hq, hkv, positions_BxT, shared_kv, cache, train=train)
    x_BxTxD = x_BxTxD + out_BxTxD
    h = cfg.norm.build(cfg, name="mlp_norm")(x_BxTxD, train=train)
    mlp = cfg.mlp.build(cfg, cfg.projection.factory(cfg, self.layer, "mlp"))
    return x_BxTxD + mlp(h, train=train), kv, cache


class Transformer(nn.Module):
  """tokens (B, T) int -> logits (B, T, V) of the next token.

  `hidden()` gives the final-normed trunk output. With `mtp.heads` = n > 1, `heads_hidden()`
  gives the n heads' states (head 1 is the next-token path, so a model stripped of heads 2..n is
  an ordinary LM) and `project()` maps a state to logits through the shared final norm and
  unembedding. `train=True` switches on the components' train-only behaviour (noise, dropout),
  which draws from the PRNG streams of `config.rng_streams`. The `decode*` methods continue each
  row from its cached length (see jaxtricks.decode.init_cache) and return (output, new cache).
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = cfg.embed.build(cfg)
    block = nn.remat(Block) if cfg.remat else Block
    self.blocks = [block(cfg, i, name=f"block_{i}") for i in range(cfg.depth)]
    self.final_norm = cfg.norm.build(cfg)
    self.head = cfg.head.build(cfg)
    self.mtp = cfg.mtp.build(cfg, block)

  def _trunk(self, tokens_BxT, positions_BxT, cache, train):
    """(Trunk of pre-norm states and positions, updated cache or None)."""
    if cache is not None:  # tree nodes (jaxtricks.ops.tree) sit at their depth past the length
      offsets_T = cache["tree"]["depth"] if "tree" in cache else jnp.arange(tokens_BxT.shape[1])
      positions_BxT = cache["lengths"][:, None] + offsets_T
    # Without a cache and positions, every row is at 0..T-1 (static RoPE tables and mask).
    x_BxTxD = self.embed(tokens_BxT, train=train)
    x_BxTxD, z_BxTxD, new_cache = self.config.attention.run_blocks(
        self.config, self.blocks, x_BxTxD, positions_BxT, cache, train)
    if cache is not None:
      new_cache["lengths"] = cache["lengths"] + tokens_BxT.shape[1]
    return Trunk(x_BxTxD, z_BxTxD, positions_BxT), new_cache

  def _heads(self, tokens_BxT, positions_BxT, cache, n_heads, train):
    n = self.config.mtp.heads if n_heads is None else n_heads
    trunk, new_cache = self._trunk(tokens_BxT, positions_BxT, cache, train)
    states = self.config.mtp.states(self.mtp, trunk, tokens_BxT, self.embed, cache, new_cache, n,
                                    train)
    return jnp.stack([trunk.x_BxTxD, *states]), new_cache

  def hidden(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
             train: bool = False) -> jnp.ndarray:
    """Final-normed hidden states (B, T, D)."""
    return self.final_norm(self._trunk(tokens_BxT, positions_BxT, None, train)[0].x_BxTxD,
                           train=train)

  def heads_hidden(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
                   n_heads: int | None = None, train: bool = False) -> jnp.ndarray:
    """Pre-norm states (n, B, T, D) of heads 1..n (n = n_heads or all); head i at position t
    predicts token t + i (jaxtricks.layers.mtp for each kind)."""
    return self._heads(tokens_BxT, positions_BxT, None, n_heads, train)[0]

  def project(self, h_BxTxD: jnp.ndarray) -> jnp.ndarray:
    """Logits of a pre-norm state through the shared final norm and unembedding."""
    return self.logits(self.final_norm(h_BxTxD))

  def logits(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
    return self.head(x_BxTxD).astype(jnp.float32)

  def __call__(self, tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray | None = None,
               train: bool = False) -> jnp.ndarray:
    if self.is_initializing() and self.config.mtp.heads > 1:
      self.heads_hidden(tokens_BxT, positions_BxT)  # creates the extra heads' parameters
    return self.logits(self.hidden(tokens_BxT, positions_BxT, train))

  def decode(self, tokens_BxT: jnp.ndarray, cache: dict) -> tuple[jnp.ndarray, dict]:
    """(logits (B, T, V), updated cache) of tokens continuing each row of the cache."""
    x_BxTxD, cache = self.decode_hidden(tokens_BxT, cache)
    return self.logits(x_BxTxD), cache

  def decode_hidden(self, tokens_BxT: jnp.ndarray, cache: dict) -> tuple[jnp.ndarray, dict]:
    trunk, cache = self._trunk(tokens_BxT, None, cache, False)
    return self.final_norm(trunk.x_BxTxD), cache

  def decode_heads_hidden(self, tokens_BxT: jnp.ndarray, cache: dict, n_heads: int | None = None
                          ) -> tuple[jnp.ndarray, dict]:
    """(pre-norm states (n, B, T, D) of heads 1..n, updated cache) with the heads' caches."""
    return self._heads(tokens_BxT, None, cache, n_heads, False)

  def draft_step(self, h_prev_BxTxD: jnp.ndarray, tokens_BxT: jnp.ndarray,
                 positions_BxT: jnp.ndarray, cache: dict, module: int
                 ) -> tuple[jnp.ndarray, dict]:
    """Chained drafting (heads whose `mtp.chains`): multi-token module `module` (1-based) on the
    previous pre-norm state and the tokens after it, with its cache: (its state, cache)."""
    return self.config.mtp.step(self.mtp, module, h_prev_BxTxD, tokens_BxT, positions_BxT,
                                self.embed, cache)

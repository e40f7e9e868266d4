"""Multi-token prediction heads (Gloeckle et al. 2024, arXiv 2404.19737; DeepSeek-V3, arXiv
2412.19437): head i of n predicts token t + i from the trunk at position t. Head 1 is the model's
next-token path; heads 2..n are modules `mtp_1 .. mtp_{n-1}` beside the trunk, of one of three
kinds, each a component of the `mtp` slot:

- `transformer`: parallel transformer layers on the input of the last trunk block (Gloeckle et
  al.), each with a KV cache of its own, so they draft for self-speculative decoding; with
  `stacked_decode`, decoding runs them as one layer vmapped over the heads (`stacked_heads`:
  their parameters stacked, one cache entry `mtp_heads` of (n - 1, B, ...) arrays);
- `linear`: z + z W_i on the trunk output (their Table S5 "linear"); W_i starts small, so every
  head starts as a copy of the next-token head and learns its offset;
- `sequential`: DeepSeek-V3's modules (eq. 21-22), a block over W [RMSNorm(h_prev);
  RMSNorm(Emb(token t + i))], W a 2D -> D projection, chained from the trunk output; they draft
  one module at a time from the last accepted state, each module with a KV cache of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.layers.linear import Linear
from jaxtricks.layers.norm import RMSNorm
from jaxtricks.models.trunk import cache_entry
from jaxtricks.registry import Component, register


class Trunk(NamedTuple):
  """What the heads read: the last block's output and input (pre-norm), and the positions."""
  x_BxTxD: jnp.ndarray
  z_BxTxD: jnp.ndarray
  positions_BxT: jnp.ndarray | None


class ResidualLinearHead(nn.Module):
  """z + act(z W), W drawn with std `std_scale` / sqrt(D) (0: zeros); act None: identity."""
  dtype: str = "float32"
  param_dtype: str = "float32"
  std_scale: float = 0.02
  activation: Callable[[jnp.ndarray], jnp.ndarray] | None = None

  @nn.compact
  def __call__(self, z_BxTxD: jnp.ndarray) -> jnp.ndarray:
    d = z_BxTxD.shape[-1]
    w = Linear((d,), ("embed", "embed_out"), std=self.std_scale * d ** -0.5, dtype=self.dtype,
               param_dtype=self.param_dtype, name="proj")
    out_BxTxD = w(z_BxTxD)
    return z_BxTxD + (out_BxTxD if self.activation is None else self.activation(out_BxTxD))


class SequentialModule(nn.Module):
  """One DeepSeek-V3 module: `block` (the Transformer's block class) over the projection of the
  previous state and the next token's embedding, both RMS-normalised."""
  config: Any
  block: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, h_prev_BxTxD, emb_BxTxD, positions_BxT, cache: dict | None = None,
               train: bool = False) -> tuple[jnp.ndarray, dict | None]:
    """(state (B, T, D), updated cache or None); a cache holds the block's K/V."""
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    both_BxTx2xD = jnp.stack([RMSNorm(name="h_norm", **norm)(h_prev_BxTxD),
                              RMSNorm(name="emb_norm", **norm)(emb_BxTxD)], axis=-2)
    x_BxTxD = Linear((cfg.d_model,), ("mtp_in", "embed", "embed_out"), in_ndim=2, name="proj",
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype)(both_BxTx2xD)
    block = self.block(cfg, cfg.depth - 1, own_kv=True, name="block")
    h_BxTxD, _, cache = block(x_BxTxD, positions_BxT, None, cache, train=train)
    return h_BxTxD, cache


@dataclasses.dataclass(frozen=True)
class MultiTokenHeads(Component):
  """n = `heads` heads; `compute_matched` removes n - 1 trunk layers; heads 2..n weigh
  loss_lambda / (n - 1) in the loss (0: every head weighs 1)."""
  heads: int = 1
  compute_matched: bool = False
  loss_lambda: float = 0.0
  can_draft: ClassVar[bool] = True   # heads 2..n draft for self-speculative decoding
  chains: ClassVar[bool] = False     # drafts one module at a time (`step`), not in parallel
  blocks: ClassVar[bool] = False     # each head is a transformer block (costs a trunk layer)

  def layers_removed(self, model: Any) -> int:
    return self.heads - 1 if self.compute_matched else 0

  def validate(self, model: Any) -> None:
    if self.heads < 1 or self.loss_lambda < 0:
      raise ConfigError(f"model.mtp.heads={self.heads} must be >= 1 and model.mtp.loss_lambda="
                        f"{self.loss_lambda} >= 0")

  def build(self, model: Any, block: Callable[..., nn.Module]) -> list[nn.Module]:
    """Modules mtp_1 .. mtp_{heads-1}; `block` is the Transformer's block class."""
    raise NotImplementedError

  def states(self, heads: list[nn.Module], trunk: Trunk, tokens_BxT: jnp.ndarray,
             embed: Callable, cache: dict | None, new_cache: dict | None, n: int,
             train: bool) -> list[jnp.ndarray]:
    """Pre-norm states of heads 2..n; writes their updated caches into `new_cache`."""
    raise NotImplementedError

  def step(self, heads: list[nn.Module], module: int, h_prev_BxTxD: jnp.ndarray,
           tokens_BxT: jnp.ndarray, positions_BxT: jnp.ndarray, embed: Callable,
           cache: dict) -> tuple[jnp.ndarray, dict]:
    """Chained drafting (`chains`): module `module` (1-based) on the previous state and the
    tokens after it, at positions_BxT, with its cache: (its state, the updated cache)."""
    raise NotImplementedError(f"model.mtp={self.kind!r} heads draft in parallel")


def stacked_heads(heads: list[nn.Module], z_BxTxD: jnp.ndarray, positions_BxT: jnp.ndarray,
                  entry: dict) -> tuple[jnp.ndarray, dict]:
  """Blocks `heads` (J of one architecture, bound) as one block vmapped over J, their parameters
  stacked: (states (J, B, T, D), updated cache); the cache entry holds (J, B, ...) arrays, head
  j's cache at [j], and what `cache_entry` adds for all heads. Equal to calling each head on its
  own cache."""
  params_J = jax.tree.map(lambda *p: jnp.stack(p), *[h.variables["params"] for h in heads])
  block = heads[0].clone(parent=None)
  shared = {name: x for name, x in entry.items() if name not in ("k", "v")}

  def one(params, kv):
    h_BxTxD, _, kv = block.apply({"params": params}, z_BxTxD, positions_BxT, None,
                                 {**kv, **shared})
    return h_BxTxD, kv

  return jax.vmap(one)(params_J, {"k": entry["k"], "v": entry["v"]})


@register("mtp", "transformer")
@dataclasses.dataclass(frozen=True)
class TransformerHeads(MultiTokenHeads):
  blocks: ClassVar[bool] = True
  stacked_decode: bool = False  # decode the heads as one vmapped layer (benchmarks/mtp.py)

  def build(self, model, block):
    return [block(model, model.depth - 1, own_kv=True, name=f"mtp_{i}")
            for i in range(1, self.heads)]

  def states(self, heads, trunk, tokens_BxT, embed, cache, new_cache, n, train):
    z_BxTxD, positions_BxT = trunk.z_BxTxD, trunk.positions_BxT
    if cache is None:
      return [head(z_BxTxD, positions_BxT, None, None, train=train)[0] for head in heads[:n - 1]]
    if self.stacked_decode and n > 1:
      h_JxBxTxD, new_cache["mtp_heads"] = stacked_heads(heads[:n - 1], z_BxTxD, positions_BxT,
                                                        cache_entry(cache, "mtp_heads"))
      return list(h_JxBxTxD)
    out = []
    for i, head in enumerate(heads[:n - 1], start=1):
      h_BxTxD, _, new_cache[f"mtp_{i}"] = head(z_BxTxD, positions_BxT, None,
                                               cache_entry(cache, f"mtp_{i}"), train=train)
      out.append(h_BxTxD)
    return out

  def cache_entries(self, model, batch, max_len, mtp_heads):
    j = min(self.heads, mtp_heads) - 1
    one = lambda: model.attention.kv_cache(model, batch, max_len)  # noqa: E731
    if self.stacked_decode:
      return {"mtp_heads": jax.tree.map(lambda x: jnp.stack([x] * j), one())} if j > 0 else {}
    return {f"mtp_{i}": one() for i in range(1, j + 1)}


@register("mtp", "linear")
@dataclasses.dataclass(frozen=True)
class LinearHeads(MultiTokenHeads):
  def build(self, model, block):
    return [ResidualLinearHead(dtype=model.dtype, param_dtype=model.param_dtype,
                               name=f"mtp_{i}") for i in range(1, self.heads)]

  def states(self, heads, trunk, tokens_BxT, embed, cache, new_cache, n, train):
    return [head(trunk.x_BxTxD) for head in heads[:n - 1]]


@register("mtp", "sequential")
@dataclasses.dataclass(frozen=True)
class SequentialHeads(MultiTokenHeads):
  """With a cache (decoding), module i runs over the given tokens as in training (token t + i
  from the tokens given, 0 past their end) and writes its cache at their positions; drafting
  then chains the modules from the last accepted state (`step`), overwriting that position's
  entries with the drafted tokens' inputs. Entries at earlier positions whose token t + i was
  not yet known keep the inputs of their verification block: they only change the drafts,
  never the output, which the next-token head verifies."""
  chains: ClassVar[bool] = True
  blocks: ClassVar[bool] = True

  def build(self, model, block):
    return [SequentialModule(model, block, name=f"mtp_{i}") for i in range(1, self.heads)]

  def states(self, heads, trunk, tokens_BxT, embed, cache, new_cache, n, train):
    out, h_BxTxD = [], trunk.x_BxTxD
    for i, head in enumerate(heads[:n - 1], start=1):
      # Token t + i feeds module i at position t; past the end: token 0 (its target is masked).
      shifted_BxT = jnp.pad(tokens_BxT[:, i:], ((0, 0), (0, i)))
      head_cache = None if cache is None else cache[f"mtp_{i}"]
      h_BxTxD, head_cache = head(h_BxTxD, embed(shifted_BxT, train=train), trunk.positions_BxT,
                                 head_cache, train=train)
      if cache is not None:
        new_cache[f"mtp_{i}"] = head_cache
      out.append(h_BxTxD)
    return out

  def step(self, heads, module, h_prev_BxTxD, tokens_BxT, positions_BxT, embed, cache):
    h_BxTxD, head_cache = heads[module - 1](h_prev_BxTxD, embed(tokens_BxT), positions_BxT,
                                            cache[f"mtp_{module}"])
    return h_BxTxD, {**cache, f"mtp_{module}": head_cache}

  def cache_entries(self, model, batch, max_len, mtp_heads):
    return {f"mtp_{i}": model.attention.kv_cache(model, batch, max_len)
            for i in range(1, min(self.heads, mtp_heads))}

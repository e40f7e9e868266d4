"""Reading and substituting the trunk blocks' residual streams from outside the model, with
`flax.linen.intercept_methods` on each trunk `Block.__call__` (not the multi-token heads'): the
linearity analysis (jaxtricks.analysis.linearity) and regularisers over hidden states
(jaxtricks.train.cosine_reg) use them; the Transformer is not changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.models.transformer import Block, Transformer

__all__ = ["block_input", "recorded_blocks", "replaced_blocks", "trunk_layer", "without_remat"]

_BLOCK_NAME = re.compile(r"block_(\d+)$")


def without_remat(model: Transformer) -> Transformer:
  """The same model without remat (values recorded inside jax.checkpoint would leak)."""
  cfg = model.config
  return Transformer(dataclasses.replace(cfg, remat=False)) if cfg.remat else model


def trunk_layer(context: Any) -> int | None:
  """The layer of a trunk Block's `__call__` (not a multi-token head's), else None."""
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, Block):
    return None
  match = _BLOCK_NAME.match(module.name or "")
  if match is None or not isinstance(module.parent, Transformer):
    return None
  return int(match.group(1))


def block_input(args: tuple, kwargs: dict) -> jnp.ndarray:
  return args[0] if args else kwargs["x_BxTxD"]


@contextlib.contextmanager
def recorded_blocks(record: dict[int, tuple[jnp.ndarray, jnp.ndarray]]) -> Iterator[None]:
  """Within it, every trunk block call stores (input x, output x) in record[layer] (the last
  call wins: an iterative layout runs some blocks several times)."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    layer = trunk_layer(context)
    if layer is not None:
      record[layer] = (block_input(args, kwargs), out[0])
    return out
  with nn.intercept_methods(interceptor):
    yield


@contextlib.contextmanager
def replaced_blocks(maps: dict[int, tuple[Any, Any]],
                    on: Any = None) -> Iterator[None]:
  """Within it, trunk block i of `maps` outputs x A + b (A, b = maps[i]) in place of its
  residual stream; its K/V and cache are the original block's. `on` (optional, indexed by layer,
  traced or not) switches each replacement on or off without retracing."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    layer = trunk_layer(context)
    if layer is None or layer not in maps:
      return out
    a_DxD, b_D = maps[layer]
    x_BxTxD = block_input(args, kwargs)
    lin_BxTxD = (x_BxTxD.astype(jnp.float32) @ jnp.asarray(a_DxD, jnp.float32)
                 + jnp.asarray(b_D, jnp.float32)).astype(out[0].dtype)
    if on is not None:
      lin_BxTxD = jnp.where(on[layer], lin_BxTxD, out[0])
    return (lin_BxTxD, *out[1:])
  with nn.intercept_methods(interceptor):
    yield

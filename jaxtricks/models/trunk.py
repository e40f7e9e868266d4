"""Running the Transformer's blocks under a K/V layout (jaxtricks.ops.kv_layout).

The attention component runs the trunk (`AttentionConfig.run_blocks`), so a layout that changes
the order of computation (LCKV's layers reading a later layer) arrives as a component, not as an
edit to the Transformer. Every block is called as
`block(x, positions, shared_kv, layer_cache, train) -> (x, kv, layer_cache)`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def cache_entry(cache: dict | None, name: str) -> dict | None:
  """The cache entry `name` of one attention layer with what the decoding call says about the
  new tokens: `tree` (they are the nodes of a candidate tree, jaxtricks.ops.tree) and `limits`
  (prefill padding, which ring buffers and recurrent states leave out)."""
  if cache is None:
    return None
  entry = cache[name]
  for key in ("tree", "limits"):
    if key in cache:
      entry = {**entry, key: cache[key]}
  return entry


def layer_cache(cache: dict | None, layer: int) -> dict | None:
  """Block `layer`'s cache entry (`cache_entry`)."""
  return cache_entry(cache, f"layer_{layer}")


def run_layers(plan: tuple, blocks: list, layers: range, x_BxTxD: jnp.ndarray,
               positions_BxT: jnp.ndarray | None, cache: dict | None, new_cache: dict | None,
               train: bool, kv_of_layer: dict[int, Any]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Runs `layers` bottom to top: (output, the last one's input). A layer reads
  kv_of_layer[its source]; producers add their K/V to kv_of_layer and their cache to new_cache
  (both updated in place)."""
  z_BxTxD = x_BxTxD
  for i in layers:
    spec = plan[i]
    z_BxTxD = x_BxTxD
    entry = layer_cache(cache, i) if spec.produces else None
    x_BxTxD, kv, entry = blocks[i](x_BxTxD, positions_BxT, kv_of_layer.get(spec.source), entry,
                                   train)
    if spec.produces:
      kv_of_layer[i] = kv
      if new_cache is not None:
        new_cache[f"layer_{i}"] = entry
  return x_BxTxD, z_BxTxD


def run_sequential(plan: tuple, blocks: list, x_BxTxD: jnp.ndarray,
                   positions_BxT: jnp.ndarray | None, cache: dict | None, train: bool
                   ) -> tuple[jnp.ndarray, jnp.ndarray, dict | None]:
  """Every block once, bottom to top, each reading an earlier (or its own) layer's K/V:
  (output, the last block's input, updated cache or None)."""
  new_cache = None if cache is None else dict(cache)
  x_BxTxD, z_BxTxD = run_layers(plan, blocks, range(len(blocks)), x_BxTxD, positions_BxT, cache,
                                new_cache, train, {})
  return x_BxTxD, z_BxTxD, new_cache

"""K/V layouts: per layer, which layer's keys and values it attends to and over what window.

One `LayerKV` per layer. `source` is the layer whose K/V it reads: itself (a producer, with K/V
projections and a cache), an earlier layer (Cross-Layer Attention, Brandon et al. 2024, arXiv
2405.12981) or a later one (Layer-Condensed KV, Wu & Tu 2024, arXiv 2405.10637: such a layer
cannot see its own token's K/V, whose computation depends on it, so its diagonal is masked).
`window` W > 0 restricts attention to the last W positions (sliding window, as in the lower half
of YOCO, Sun et al. 2024, arXiv 2405.05254): key j is visible to query i iff i - W < j <= i, and
the producer's cache is a ring buffer of about W positions instead of the whole sequence.

Examples on 8 layers: CLA2 sources 0,0,2,2,4,4,6,6; LCKV with two warm-up layers (one at each
end) 0,6,6,6,6,6,6,7; YOCO-like 0,1,2,3,4,4,4,4 with window W on layers 0-3.
"""

from __future__ import annotations

from typing import NamedTuple


class LayerKV(NamedTuple):
  layer: int
  source: int
  window: int = 0  # 0: global (every earlier position)

  @property
  def produces(self) -> bool:
    return self.source == self.layer

  @property
  def masks_diagonal(self) -> bool:
    """Reads a later layer's K/V (LCKV): its own token's entry is not visible."""
    return self.source > self.layer


def kv_sources(n_layers: int, sharing: int = 1, layout: tuple[int, ...] = ()) -> tuple[int, ...]:
  """Layer i reads the K/V produced by layer kv_sources[i] (a producer has kv_sources[i] == i).

  An explicit `layout` wins (KeepEnds, DenseFront, DenseBack, LCKV, YOCO, ...); every entry must
  name a producing layer of the model. Otherwise sharing factor s (CLA-s): groups of s
  consecutive layers share the first one's K/V; when s does not divide the depth, the first
  group is the short one (20 layers, CLA3: 7 producers, as in the CLA paper).
  """
  if layout:
    if len(layout) != n_layers:
      raise ValueError(f"kv layout has {len(layout)} entries for {n_layers} layers")
    for i, src in enumerate(layout):
      if not 0 <= src < n_layers:
        raise ValueError(f"kv layout {layout}: layer {i} reads layer {src}, outside the model's "
                         f"{n_layers} layers")
      if layout[src] != src:
        raise ValueError(f"kv layout {layout}: layer {i} reads layer {src}, which does not "
                         f"produce K/V (it reads layer {layout[src]})")
    return tuple(layout)
  if not 1 <= sharing <= n_layers:
    raise ValueError(f"CLA sharing factor {sharing} must be between 1 and the depth {n_layers}")
  first = n_layers % sharing or sharing
  return tuple(0 if i < first else first + (i - first) // sharing * sharing
               for i in range(n_layers))


def kv_plan(sources: tuple[int, ...], window: int = 0,
            window_layers: tuple[int, ...] = ()) -> tuple[LayerKV, ...]:
  """The per-layer description of `sources` with sliding window `window` on `window_layers`
  (every layer when empty). A layer reading a windowed producer must have the same window (the
  producer's cache keeps only that many positions); a layer read by an earlier layer cannot be
  windowed."""
  n = len(sources)
  if window < 0:
    raise ValueError(f"window must be >= 1 (0: off), got {window}")
  if window_layers and window < 1:
    raise ValueError(f"window_layers {window_layers} need a window >= 1, got {window}")
  for i in window_layers:
    if not 0 <= i < n:
      raise ValueError(f"window_layers names layer {i}, outside the model's {n} layers")
  windowed = set(window_layers or (range(n) if window else ()))
  plan = tuple(LayerKV(i, src, window if i in windowed else 0) for i, src in enumerate(sources))
  for spec in plan:
    producer = plan[spec.source]
    if producer.window and spec.window != producer.window:
      raise ValueError(f"layer {spec.layer} reads the K/V of layer {spec.source}, which has a "
                       f"sliding window of {producer.window}: give it the same window")
    if spec.masks_diagonal and producer.window:
      raise ValueError(f"layer {spec.source} is read by the earlier layer {spec.layer}; it cannot "
                       f"have a sliding window")
  return plan


def cycle(plan: tuple[LayerKV, ...]) -> tuple[int, int] | None:
  """(low, high): the layers from the first one reading a later layer up to the last layer read
  that way (LCKV's iterated span), or None when no layer reads a later one."""
  later = [s for s in plan if s.masks_diagonal]
  if not later:
    return None
  return min(s.layer for s in later), max(s.source for s in later)


def ring_size(window: int, max_len: int, chunk: int) -> int:
  """Slots of a sliding-window cache: the window plus the largest block of tokens a decoding step
  may write and then roll back (speculative verification), at most `max_len`."""
  return min(window + chunk, max_len)

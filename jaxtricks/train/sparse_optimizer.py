"""Optimizer wrappers for SLoPe (arXiv 2405.16325): state for kept weights only, and lazy adapters.

`keep_nm_sparse(inner, leaves)`: the inner optimizer sees each N:M sparse kernel as its kept
values only (the grouped axis shrunk by N/M), so Adam's moments of a 2:4 kernel take half the
memory; its updates are scattered back with zeros at pruned entries, which therefore stay exactly
zero (the static mask). The kept positions are stored bit-packed in the optimizer state.

`after_step(inner, start)`: no update and no state change before step `start`; the lazy low-rank
adapters of the last 1% of training use it, with a learning-rate schedule offset by `start`.
`draw_adapters(start, seed)` sets each adapter's L (zero until then, which keeps the adapter
branch switched off) to a random draw by the update before step `start`.

`refresh_col_masks(inner, every, leaves)`: SLoPe's mask_change_freq, the transposed masks held
as parameters and overwritten every `every` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxtricks.layers.nm_projection import SlopeProjection
from jaxtricks.layers.sparse_linear import ADAPTER_NAMES, NMLeaf, col_positions
from jaxtricks.models.sparse import nm_leaves
from jaxtricks.ops import sparsity
from jaxtricks.train.hooks import OptimizerParts, optimizer_hook

Path = tuple[str, ...]  # a parameter's keys, as flax.traverse_util.flatten_dict gives them


def _unbox(x):
  return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _map_sparse(fn: Callable, tree: Any, leaves: dict[Path, NMLeaf]) -> Any:
  """tree with fn(value, path, leaf) at the sparse paths (boxed values keep their names)."""
  flat = traverse_util.flatten_dict(tree)
  for path, leaf in leaves.items():
    value = flat[path]
    new = fn(_unbox(value), path, leaf)
    flat[path] = value.replace_boxed(new) if isinstance(value, nn.meta.AxisMetadata) else new
  return traverse_util.unflatten_dict(flat)


class NMSparseState(NamedTuple):
  positions: Any  # nested dict of packed kept positions, one uint8 vector per sparse kernel
  inner: Any


def keep_nm_sparse(inner: optax.GradientTransformation,
                   leaves: dict[Path, NMLeaf]) -> optax.GradientTransformation:
  """Runs `inner` on the kept values of the sparse kernels (see module docstring)."""
  def positions(packed: dict[Path, jnp.ndarray], tree: Any) -> dict[Path, jnp.ndarray]:
    flat = traverse_util.flatten_dict(tree)
    return {path: sparsity.unpack_positions(packed[path], _unbox(flat[path]).shape, leaf.n,
                                            leaf.m, leaf.axis)
            for path, leaf in leaves.items()}

  def init(params):
    flat = traverse_util.flatten_dict(params)
    pos = {}
    for path, leaf in leaves.items():
      mask = sparsity.nm_mask(_unbox(flat[path]), leaf.n, leaf.m, leaf.axis)
      pos[path] = sparsity.kept_positions(mask, leaf.n, leaf.m, leaf.axis)
    packed = {path: sparsity.pack_bits(p, sparsity.index_bits(leaves[path].m))
              for path, p in pos.items()}
    view = _map_sparse(lambda w, path, leaf: sparsity.gather_kept(w, pos[path], leaf.m, leaf.axis),
                       params, leaves)
    return NMSparseState(traverse_util.unflatten_dict(packed), inner.init(view))

  def update(updates, state, params=None):
    pos = positions(traverse_util.flatten_dict(state.positions), updates)
    gather = lambda w, path, leaf: sparsity.gather_kept(w, pos[path], leaf.m, leaf.axis)
    g_view = _map_sparse(gather, updates, leaves)
    p_view = None if params is None else _map_sparse(gather, params, leaves)
    u_view, inner_state = inner.update(g_view, state.inner, p_view)
    scatter = lambda u, path, leaf: sparsity.scatter_kept(u, pos[path], leaf.n, leaf.m, leaf.axis)
    return _map_sparse(scatter, u_view, leaves), NMSparseState(state.positions, inner_state)

  return optax.GradientTransformation(init, update)


class AfterStepState(NamedTuple):
  count: jnp.ndarray
  inner: Any


def after_step(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  """`inner` from step `start` on; before it, zero updates and an untouched inner state."""
  def init(params):
    return AfterStepState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    def run(_):
      return inner.update(updates, state.inner, params)

    def skip(_):
      return jax.tree.map(jnp.zeros_like, updates), state.inner

    new_updates, inner_state = jax.lax.cond(state.count >= start, run, skip, None)
    return new_updates, AfterStepState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def is_adapter(params: Any) -> Any:
  """Tree of bools: True at the low-rank adapter parameters."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: p[-1] in ADAPTER_NAMES for p in flat})


def draw_adapters(start: int, seed: int) -> optax.GradientTransformation:
  """Overwrites the update of every `adapter_l` (I, r) so that it becomes a N(0, 1/I) draw after
  update number start - 1 (the first update when start is 0); R is still zero, so the model's
  output does not change. Other updates pass through."""
  def update(updates, state, params):
    at = state.count == max(start - 1, 0)
    flat_u, flat_p = traverse_util.flatten_dict(updates), traverse_util.flatten_dict(params)
    for i, path in enumerate(sorted(p for p in flat_p if p[-1] == "adapter_l")):
      p = flat_p[path]
      draw = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), p.shape, p.dtype)
      flat_u[path] = jnp.where(at, draw * p.shape[0] ** -0.5 - p, flat_u[path])
    return traverse_util.unflatten_dict(flat_u), optax.ScaleByScheduleState(state.count + 1)

  return optax.GradientTransformation(
      lambda params: optax.ScaleByScheduleState(jnp.zeros((), jnp.int32)), update)


def zero_until(start: int, where: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Zeroes the gradients selected by `where(params)` before step `start` (so that the global
  gradient norm and its clipping ignore parameters that do not train yet)."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    selected = where(updates)
    on = state.count >= start
    updates = jax.tree.map(lambda u, s: jnp.where(on | ~s, u, 0), updates, selected)
    return updates, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def recorded_positions(opt_state: Any) -> Any:
  """The packed kept positions that keep_nm_sparse recorded at init, from the whole state."""
  while not isinstance(opt_state, NMSparseState):
    opt_state = opt_state.inner
  return opt_state.positions


class RefreshState(NamedTuple):
  count: jnp.ndarray
  inner: Any


def refresh_col_masks(inner: optax.GradientTransformation, every: int,
                      leaves: dict[Path, NMLeaf]) -> optax.GradientTransformation:
  """SLoPe's mask_change_freq: after every `every`-th update, each held transposed mask
  (`col_positions`, beside its kernel) is set to the N:M mask of the updated kernel along its
  output axis; between refreshes it does not change. Outermost, so it sees the final updates."""
  def update(updates, state, params):
    updates, inner_state = inner.update(updates, state.inner, params)
    count = state.count + 1
    flat_u, flat_p = traverse_util.flatten_dict(updates), traverse_util.flatten_dict(params)
    for path, leaf in leaves.items():
      col_path = (*path[:-1], "col_positions")
      if col_path not in flat_p:
        continue
      new = col_positions(leaf.matrix(flat_p[path] + flat_u[path]), leaf.n, leaf.m)
      flat_u[col_path] = jnp.where(count % every == 0, new - flat_p[col_path], 0.0)
    return traverse_util.unflatten_dict(flat_u), RefreshState(count, inner_state)

  return optax.GradientTransformation(
      lambda params: RefreshState(jnp.zeros((), jnp.int32), inner.init(params)), update)


def adapter_start_step(steps: int, projection: SlopeProjection) -> int:
  return int(round(projection.adapter_start * steps))


@optimizer_hook(SlopeProjection)
def slope_optimizer(parts: OptimizerParts, projection: SlopeProjection) -> None:
  """Adapters train from `adapter_start` of the run on (their own AdamW, its schedule shifted to
  start there) and are drawn at that step; every sparse kernel keeps state for its kept entries
  only; a held transposed mask is refreshed every `mask_change_freq` steps."""
  cfg = parts.train
  if projection.adapter_rank:
    start = adapter_start_step(cfg.steps, projection)
    late = after_step(parts.adamw(lambda count: parts.schedule(count + start)), start)
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda a: "adapter" if a else "main", is_adapter(params))
    parts.core = optax.chain(optax.multi_transform({"main": parts.core, "adapter": late}, labels),
                             draw_adapters(start, cfg.seed))
    parts.first.append(zero_until(start, is_adapter))
  leaves = nm_leaves(parts.model)
  parts.wrappers.append(lambda tx: keep_nm_sparse(tx, leaves))
  if projection.mask_change_freq > 1 and projection.backward == "double":
    parts.wrappers.append(
        lambda tx: refresh_col_masks(tx, projection.mask_change_freq, leaves))

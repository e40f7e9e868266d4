"""Vocabulary-parallel cross entropy (Megatron-LM's parallel softmax, Shoeybi et al. 2019, arXiv
1909.08053, sec. 3), written per device with `jax.shard_map`.

The unembedding W (D, V) is split over the mesh axis `vocab_axis` into slices W_v of V / P
columns. Device p computes only its logits z_p = x W_p and combines the softmax statistics with
collectives:
    m   = pmax_p max_v z_pv                     (for stability; no gradient flows through it)
    lse = m + log psum_p sum_v exp(z_pv - m)
    z_t = psum_p [target in slice p] z_p,target
    loss = lse - z_t
so no device ever holds the full (B, T, V) logits. Tokens go through in chunks of ROW_CHUNK, and
the gradient is written out (a custom VJP): d loss / d z_p = softmax_p - onehot_p(target), with
softmax_p = exp(z_p - lse) recomputed per chunk from x, W_p and the saved lse, so the loss's
temporaries are one chunk's (ROW_CHUNK, V / P) slice, not (B, T, V / P); the gradient of the
replicated x is summed over the slices, that of W_p over the row shards. The
argmax for accuracy takes the lowest global index among the slices' maxima, as jnp.argmax does.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def _forward(x_BxTxD, w_DxV, targets_BxT, vocab_axis: str):
  """One device's share: per-token loss, correctness and log-sum-exp (B, T) from its slice."""
  v_local = w_DxV.shape[1]
  offset = jax.lax.axis_index(vocab_axis) * v_local
  logits_BxTxV = jnp.einsum("BTD,DV->BTV", x_BxTxD, w_DxV, preferred_element_type=jnp.float32)
  local_max_BxT = jnp.max(logits_BxTxV, axis=-1)
  m_BxT = jax.lax.pmax(local_max_BxT, vocab_axis)
  sum_exp_BxT = jax.lax.psum(jnp.sum(jnp.exp(logits_BxTxV - m_BxT[..., None]), axis=-1),
                             vocab_axis)
  lse_BxT = m_BxT + jnp.log(sum_exp_BxT)
  index_BxT = targets_BxT - offset
  mine_BxT = (index_BxT >= 0) & (index_BxT < v_local)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, jnp.clip(index_BxT, 0, v_local - 1)[..., None],
                                   axis=-1)[..., 0]
  target_logit_BxT = jax.lax.psum(jnp.where(mine_BxT, picked_BxT, 0.0), vocab_axis)
  # Global argmax, first index on ties: the smallest index among slices holding the maximum.
  local_arg_BxT = jnp.argmax(logits_BxTxV, axis=-1) + offset
  big = jnp.iinfo(jnp.int32).max
  pred_BxT = jax.lax.pmin(jnp.where(local_max_BxT >= m_BxT, local_arg_BxT, big).astype(jnp.int32),
                          vocab_axis)
  correct_BxT = (pred_BxT == targets_BxT).astype(jnp.float32)
  return lse_BxT - target_logit_BxT, correct_BxT, lse_BxT


ROW_CHUNK = 512  # tokens whose logits slice is alive at once (forward and backward)


def row_chunk(rows: int, target: int | None = None) -> int:
  """The largest divisor of `rows` not above `target` (default ROW_CHUNK); all rows when that
  would be tiny."""
  target = ROW_CHUNK if target is None else target
  chunk = next(c for c in range(min(rows, target), 0, -1) if rows % c == 0)
  return chunk if chunk >= min(rows, target) // 4 else rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _local(x_BxTxD, w_DxV, targets_BxT, vocab_axis: str, row_axes: tuple[str, ...]):
  return _local_fwd(x_BxTxD, w_DxV, targets_BxT, vocab_axis, row_axes)[0]


def _chunks(x_BxTxD, targets_BxT):
  """Rows as (n, 1, c, D) and (n, 1, c): n chunks of c tokens."""
  b, t, d = x_BxTxD.shape
  c = row_chunk(b * t)
  return x_BxTxD.reshape(-1, 1, c, d), targets_BxT.reshape(-1, 1, c)


def _local_fwd(x_BxTxD, w_DxV, targets_BxT, vocab_axis, row_axes):
  xs, ts = _chunks(x_BxTxD, targets_BxT)
  loss, correct, lse = jax.lax.map(lambda a: _forward(a[0], w_DxV, a[1], vocab_axis), (xs, ts))
  shape = targets_BxT.shape
  # Only the inputs and the log-sum-exp are kept: the backward recomputes each chunk's logits
  # slice, so one chunk's (c, V / P) logits and gradient are alive at a time.
  return ((loss.reshape(shape), correct.reshape(shape)),
          (x_BxTxD, w_DxV, targets_BxT, lse.reshape(shape)))


def _local_bwd(vocab_axis, row_axes, res, cotangents):
  x_BxTxD, w_DxV, targets_BxT, lse_BxT = res
  g_loss_BxT = cotangents[0]  # correctness is a metric: no gradient
  v_local = w_DxV.shape[1]
  offset = jax.lax.axis_index(vocab_axis) * v_local
  xs, ts = _chunks(x_BxTxD, targets_BxT)
  lses, gs = lse_BxT.reshape(ts.shape), g_loss_BxT.reshape(ts.shape)
  w32_DxV = w_DxV.astype(jnp.float32)

  def chunk(g_w_DxV, inputs):
    x_1xCxD, t_1xC, lse_1xC, g_1xC = inputs
    logits_1xCxV = jnp.einsum("BTD,DV->BTV", x_1xCxD, w_DxV, preferred_element_type=jnp.float32)
    # d loss / d logits = softmax - onehot(target), the onehot only on the slice holding it.
    g_1xCxV = (jnp.exp(logits_1xCxV - lse_1xC[..., None])
               - jax.nn.one_hot(t_1xC - offset, v_local, dtype=jnp.float32)) * g_1xC[..., None]
    g_x_1xCxD = jax.lax.psum(jnp.einsum("BTV,DV->BTD", g_1xCxV, w32_DxV), vocab_axis)
    g_w_DxV = g_w_DxV + jnp.einsum("BTD,BTV->DV", x_1xCxD.astype(jnp.float32), g_1xCxV)
    return g_w_DxV, g_x_1xCxD

  g_w0 = jnp.zeros_like(w32_DxV)  # varying like W_p, and like the rows it sums over
  if row_axes:
    g_w0 = jax.lax.pcast(g_w0, row_axes, to="varying")
  g_w_DxV, g_xs = jax.lax.scan(chunk, g_w0, (xs, ts, lses, gs))
  if row_axes:  # W is the same on every row shard: sum its gradient over them
    g_w_DxV = jax.lax.psum(g_w_DxV, row_axes)
  return (g_xs.reshape(x_BxTxD.shape).astype(x_BxTxD.dtype), g_w_DxV.astype(w_DxV.dtype),
          np.zeros(targets_BxT.shape, jax.dtypes.float0))


_local.defvjp(_local_fwd, _local_bwd)


def vocab_parallel_cross_entropy(x_BxTxD: jnp.ndarray, w_DxV: jnp.ndarray,
                                 targets_BxT: jnp.ndarray, vocab_axis: str = "tensor",
                                 batch_axes: tuple[str, ...] = ("data", "fsdp"),
                                 seq_axis: str | None = None,
                                 mesh: jax.sharding.Mesh | None = None
                                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(per-token loss, per-token correctness), each (B, T) float32, of logits x W without
  forming them: W's columns split over `vocab_axis`, the batch over `batch_axes` and the
  sequence over `seq_axis` (None: not split). `mesh`: the mesh (default: the one set with
  jax.set_mesh). Equal to ops.losses.cross_entropy / accuracy of x W in float32."""
  chex.assert_rank([x_BxTxD, w_DxV, targets_BxT], [3, 2, 2])
  chex.assert_equal_shape_prefix([x_BxTxD, targets_BxT], 2)
  chex.assert_axis_dimension(w_DxV, 0, x_BxTxD.shape[-1])
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    raise ValueError("vocab_parallel_cross_entropy needs a mesh (pass one or use jax.set_mesh)")
  if w_DxV.shape[1] % mesh.shape[vocab_axis]:
    raise ValueError(f"mesh axis {vocab_axis!r} (size {mesh.shape[vocab_axis]}) does not divide "
                     f"the vocabulary ({w_DxV.shape[1]})")
  rows = P(batch_axes, seq_axis)
  row_axes = (*batch_axes, *((seq_axis,) if seq_axis else ()))
  fn = jax.shard_map(lambda x, w, t: _local(x, w, t, vocab_axis, row_axes), mesh=mesh,
                     in_specs=(P(batch_axes, seq_axis, None), P(None, vocab_axis), rows),
                     out_specs=(rows, rows))
  return fn(x_BxTxD, w_DxV, targets_BxT)

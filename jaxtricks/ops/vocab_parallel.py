"""Vocabulary-parallel cross entropy (Megatron-LM's parallel softmax, Shoeybi et al. 2019, arXiv
1909.08053, sec. 3), written per device with `jax.shard_map`.

The unembedding W (D, V) is split over the mesh axis `vocab_axis` into slices W_v of V / P
columns. Device p computes only its logits z_p = x W_p and combines the softmax statistics with
collectives:
    m   = pmax_p max_v z_pv                     (for stability; no gradient flows through it)
    lse = m + log psum_p sum_v exp(z_pv - m)
    z_t = psum_p [target in slice p] z_p,target
    loss = lse - z_t
so no device ever holds the full (B, T, V) logits: the loss's temporary memory is that of one
(B, T, V / P) slice. Autodiff through the collectives gives the gradients (the cotangent of the
replicated x is summed over the slices). The argmax for accuracy takes the lowest global index
among the slices' maxima, as jnp.argmax does.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _local(x_BxTxD, w_DxV, targets_BxT, vocab_axis: str):
  """One device's share: per-token loss and correctness (B, T) from its vocabulary slice."""
  v_local = w_DxV.shape[1]
  offset = jax.lax.axis_index(vocab_axis) * v_local
  logits_BxTxV = jnp.einsum("BTD,DV->BTV", x_BxTxD, w_DxV, preferred_element_type=jnp.float32)
  local_max_BxT = jax.lax.stop_gradient(jnp.max(logits_BxTxV, axis=-1))
  m_BxT = jax.lax.pmax(local_max_BxT, vocab_axis)
  sum_exp_BxT = jax.lax.psum(jnp.sum(jnp.exp(logits_BxTxV - m_BxT[..., None]), axis=-1),
                             vocab_axis)
  lse_BxT = m_BxT + jnp.log(sum_exp_BxT)
  index_BxT = targets_BxT - offset
  mine_BxT = (index_BxT >= 0) & (index_BxT < v_local)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, jnp.clip(index_BxT, 0, v_local - 1)[..., None],
                                   axis=-1)[..., 0]
  target_logit_BxT = jax.lax.psum(jnp.where(mine_BxT, picked_BxT, 0.0), vocab_axis)
  loss_BxT = lse_BxT - target_logit_BxT
  # Global argmax, first index on ties: the smallest index among slices holding the maximum.
  local_arg_BxT = jnp.argmax(logits_BxTxV, axis=-1) + offset
  at_max_BxT = local_max_BxT >= m_BxT
  big = jnp.iinfo(jnp.int32).max
  pred_BxT = jax.lax.pmin(jnp.where(at_max_BxT, local_arg_BxT, big).astype(jnp.int32), vocab_axis)
  correct_BxT = (pred_BxT == targets_BxT).astype(jnp.float32)
  return loss_BxT, jax.lax.stop_gradient(correct_BxT)


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
  fn = jax.shard_map(lambda x, w, t: _local(x, w, t, vocab_axis), mesh=mesh,
                     in_specs=(P(batch_axes, seq_axis, None), P(None, vocab_axis), rows),
                     out_specs=(rows, rows))
  return fn(x_BxTxD, w_DxV, targets_BxT)

"""Context-parallel (ring) causal attention (Liu et al. 2023, Ring Attention with Blockwise
Transformers, arXiv 2310.01889), written per device with `jax.shard_map`.

The sequence is split over the mesh axis `seq_axis` into C blocks of T / C positions: device c
holds queries, keys and values of block c. In C steps every device attends its queries to each
K/V block, passing the K/V blocks one device along the ring with `ppermute` after each step, and
merges the partial results by the online softmax (Milakov and Gimelshein 2018, arXiv 1805.02867):
    s = q k^T / sqrt(H) (masked: key position <= query position)
    m' = max(m, rowmax s),  l' = l e^(m - m') + rowsum e^(s - m'),
    o' = o e^(m - m') + e^(s - m') v,          output = o / l.
A device never holds more than one K/V block besides its own, and the attention activations
autodiff keeps are C blocks of (T / C) x (T / C) per device: 1/C of the full T x T. Blocks in a
query block's future are fully masked but still computed (no load balancing).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_NEG_INF = -1e30


def _ring(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, seq_axis: str, n_blocks: int):
  """One device: its query block against every K/V block of the ring."""
  b, t, n, h = q_BxTxNxH.shape
  kh = k_BxTxKxH.shape[2]
  me = jax.lax.axis_index(seq_axis)
  q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kh, n // kh, h)
  q_pos_T = me * t + jnp.arange(t)
  perm = [(i, (i + 1) % n_blocks) for i in range(n_blocks)]

  def attend(k, v, j):
    """Masked scores (B, K, G, T, S) against the K/V block held at step j."""
    source = (me - j) % n_blocks  # the block the K/V now held came from
    k_pos_S = source * t + jnp.arange(t)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k,
                   preferred_element_type=jnp.float32) * (h ** -0.5)
    return jnp.where(q_pos_T[:, None] >= k_pos_S[None, :], s, _NEG_INF)

  def weighted(p, v):
    return jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32)

  def step(carry, j):
    m_BxKxGxT, l_BxKxGxT, o_BxKxGxTxH, k, v = carry
    k, v = jax.lax.ppermute((k, v), seq_axis, perm)
    s = attend(k, v, j)
    m_new = jnp.maximum(m_BxKxGxT, jnp.max(s, axis=-1))
    scale = jnp.exp(m_BxKxGxT - m_new)
    p = jnp.exp(s - m_new[..., None])
    l_new = l_BxKxGxT * scale + jnp.sum(p, axis=-1)
    o_new = o_BxKxGxTxH * scale[..., None] + weighted(p, v)
    return (m_new, l_new, o_new, k, v), None

  # Step 0 is the device's own (diagonal) block: every query row sees at least itself, so the
  # running maximum is finite from the start (and the carry takes the inputs' sharding types).
  s = attend(k_BxTxKxH, v_BxTxKxH, 0)
  m_BxKxGxT = jnp.max(s, axis=-1)
  p = jnp.exp(s - m_BxKxGxT[..., None])
  init = (m_BxKxGxT, jnp.sum(p, axis=-1), weighted(p, v_BxTxKxH), k_BxTxKxH, v_BxTxKxH)
  (_, l_BxKxGxT, o_BxKxGxTxH, _, _), _ = jax.lax.scan(step, init, jnp.arange(1, n_blocks))
  out_BxKxGxTxH = o_BxKxGxTxH / l_BxKxGxT[..., None]
  return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BxTxNxH.dtype)


def context_parallel_size(seq_axis: str = "context") -> int:
  """Size of `seq_axis` in the current mesh (jax.set_mesh); 1 without a mesh or that axis."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or seq_axis not in mesh.axis_names else mesh.shape[seq_axis]


def ring_attention(q_BxTxNxH: jnp.ndarray, k_BxTxKxH: jnp.ndarray, v_BxTxKxH: jnp.ndarray,
                   seq_axis: str = "context", batch_axes: tuple[str, ...] = ("data", "fsdp"),
                   head_axis: str | None = "tensor", mesh: jax.sharding.Mesh | None = None
                   ) -> jnp.ndarray:
  """Causal attention (B, T, N, H) of queries and keys at positions 0..T-1, the sequence split
  over `seq_axis` (its size C must divide T), the batch over `batch_axes`, and the heads over
  `head_axis` where it divides both N and K. Equal to ops.attention.attention(..., causal=True).
  `mesh`: default the one set with jax.set_mesh."""
  chex.assert_rank([q_BxTxNxH, k_BxTxKxH, v_BxTxKxH], 4)
  chex.assert_equal_shape([k_BxTxKxH, v_BxTxKxH])
  chex.assert_equal_shape_prefix([q_BxTxNxH, k_BxTxKxH], 2)
  chex.assert_axis_dimension(k_BxTxKxH, 3, q_BxTxNxH.shape[3])
  n, kh = q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
  if n % kh:
    raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kh})")
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    raise ValueError("ring_attention needs a mesh (pass one or use jax.set_mesh)")
  c = mesh.shape[seq_axis]
  if q_BxTxNxH.shape[1] % c:
    raise ValueError(f"mesh axis {seq_axis!r} (size {c}) does not divide the sequence length "
                     f"({q_BxTxNxH.shape[1]})")
  heads = head_axis if head_axis and n % mesh.shape[head_axis] == 0 and (
      kh % mesh.shape[head_axis] == 0) else None
  spec = P(batch_axes, seq_axis, heads, None)
  fn = jax.shard_map(lambda q, k, v: _ring(q, k, v, seq_axis, c), mesh=mesh,
                     in_specs=(spec, spec, spec), out_specs=spec)
  return fn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)

"""N:M sparse linear maps for SLoPe (Mozaffari et al. 2024, arXiv 2405.16325) and SR-STE
(Zhou et al. 2021, arXiv 2102.04010).

A weight w (I, O) of y = x w is N:M sparse along its reduction axis I: in every group of M
consecutive entries of a column, N are kept (`nm_mask`). SLoPe's double-pruned linear:

    forward        y  = x (w * R)                 R: the static N:M mask along I
    weight grad    dw = (x^T dy) * R              only kept weights learn
    input grad     dx = dy (w * R * C)^T          C: N:M mask of w * R along O (transposed pruning)

C is recomputed from the current weights; it removes E = sum_{j>N} C(M,j) s^j (1-s)^(M-j) (j-N)/M
of the entries of a random w (s = N/M; 9.375% for 2:4), so dx is biased. SR-STE instead keeps
dense weights, recomputes the top-N-of-M mask every step, and trains with
dw = x^T dy + lambda_w (1 - mask) * w.

XLA has no N:M sparse matmul on any backend, so `SPARSE_MATMULS` maps a backend name to a
function computing a @ b with b N:M sparse along the contraction axis; the default multiplies the
zero-filled dense matrix. A hardware kernel registers there; nothing here claims its speed.
Shape contracts are chex assertions on static shapes (trace time).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import struct


def _grouped(w: jnp.ndarray, m: int, axis: int) -> tuple[jnp.ndarray, tuple[int, ...]]:
  moved = jnp.moveaxis(w, axis, -1)
  if moved.shape[-1] % m:
    raise ValueError(f"axis {axis} of size {moved.shape[-1]} is not divisible by m={m}")
  return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m), moved.shape


def nm_mask(w: jnp.ndarray, n: int, m: int, axis: int = 0) -> jnp.ndarray:
  """Boolean mask keeping the n largest |w| of every m consecutive entries along `axis` (ties go
  to the earlier entry, so every group keeps exactly n)."""
  if not 0 < n <= m:
    raise ValueError(f"N:M sparsity needs 0 < n <= m, got {n}:{m}")
  a_GxM, moved_shape = _grouped(jnp.abs(w), m, axis)
  a_i, a_j = a_GxM[..., :, None], a_GxM[..., None, :]
  earlier_JxI = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]: j comes before i
  # rank of entry i = how many entries of its group beat it; m <= 16 so the m x m compare is cheap
  rank = jnp.sum((a_j > a_i) | ((a_j == a_i) & earlier_JxI), axis=-1)
  return jnp.moveaxis((rank < n).reshape(moved_shape), -1, axis)


def expected_extra_zeros(n: int, m: int) -> float:
  """Fraction of all entries that transposed N:M pruning removes from a row-pruned random
  matrix: sum_{j=N+1..M} C(M, j) s^j (1 - s)^(M - j) (j - N) / M, s = N / M."""
  s = n / m
  return sum(math.comb(m, j) * s ** j * (1 - s) ** (m - j) * (j - n) / m
             for j in range(n + 1, m + 1))


def double_prune(w_IxO: jnp.ndarray, row_mask_IxO: jnp.ndarray, n: int, m: int) -> jnp.ndarray:
  """w * R * C: the row-pruned weight additionally pruned N:M along the output axis."""
  chex.assert_rank(w_IxO, 2, custom_message="double_prune: w_IxO")
  chex.assert_equal_shape([w_IxO, row_mask_IxO], custom_message="double_prune: row_mask_IxO")
  w_r = jnp.where(row_mask_IxO, w_IxO, 0)
  return jnp.where(nm_mask(w_r, n, m, axis=1), w_r, 0)


def _masked_dense(a_RxK: jnp.ndarray, b_KxN: jnp.ndarray, n: int, m: int) -> jnp.ndarray:
  del n, m  # b is already zero outside its N:M pattern
  return a_RxK @ b_KxN


SPARSE_MATMULS: dict[str, Callable] = {"masked_dense": _masked_dense}


def _check_linear(name: str, x_RxI, w_IxO, *masks_IxO) -> None:
  """x (R, I) @ w (I, O); every mask given has w's shape."""
  chex.assert_rank([x_RxI, w_IxO], 2, custom_message=f"{name}: x_RxI, w_IxO")
  chex.assert_axis_dimension(x_RxI, 1, w_IxO.shape[0], custom_message=f"{name}: x_RxI")
  masks = [mask for mask in masks_IxO if mask is not None]
  if masks:
    chex.assert_shape(masks, w_IxO.shape, custom_message=f"{name}: masks")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def slope_matmul(x_RxI: jnp.ndarray, w_IxO: jnp.ndarray, row_mask_IxO: jnp.ndarray, n: int,
                 m: int, scale: float = 1.0, backend: str = "masked_dense",
                 double: bool = True, col_mask_IxO: jnp.ndarray | None = None) -> jnp.ndarray:
  """SLoPe's double-pruned linear y = scale * x (w * R) (module docstring). `scale` = M/N
  rescales the kept weights (optional); `backend` names the N:M matmul in SPARSE_MATMULS;
  `col_mask_IxO` is a held transposed mask C (default: recomputed from w); double=False gives the
  exact input gradient dy (w * R)^T (an ablation of the double pruning)."""
  _check_linear("slope_matmul", x_RxI, w_IxO, row_mask_IxO, col_mask_IxO)
  w_r = jnp.where(row_mask_IxO, w_IxO, 0).astype(x_RxI.dtype)
  return SPARSE_MATMULS[backend](x_RxI, w_r, n, m) * scale


def _slope_fwd(x_RxI, w_IxO, row_mask_IxO, n, m, scale, backend, double, col_mask_IxO):
  y = slope_matmul(x_RxI, w_IxO, row_mask_IxO, n, m, scale, backend, double, col_mask_IxO)
  return y, (x_RxI, w_IxO, row_mask_IxO, col_mask_IxO)


def _slope_bwd(n, m, scale, backend, double, res, dy_RxO):
  x_RxI, w_IxO, row_mask_IxO, col_mask_IxO = res
  dw_IxO = jnp.where(row_mask_IxO, x_RxI.T @ dy_RxO, 0) * scale
  w_r_IxO = jnp.where(row_mask_IxO, w_IxO, 0)
  if double:
    if col_mask_IxO is None:
      col_mask_IxO = nm_mask(w_r_IxO, n, m, axis=1)
    w_rc_OxI = jnp.where(col_mask_IxO, w_r_IxO, 0).T.astype(dy_RxO.dtype)
    dx_RxI = SPARSE_MATMULS[backend](dy_RxO, w_rc_OxI, n, m) * scale
  else:  # w * R is not N:M along O: a dense matmul
    dx_RxI = dy_RxO @ w_r_IxO.T.astype(dy_RxO.dtype) * scale
  return dx_RxI.astype(x_RxI.dtype), dw_IxO.astype(w_IxO.dtype), None, None


slope_matmul.defvjp(_slope_fwd, _slope_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def srste_matmul(x_RxI: jnp.ndarray, w_IxO: jnp.ndarray, n: int, m: int,
                 decay: float = 2e-4) -> jnp.ndarray:
  """SR-STE: y = x (w * mask), mask = top-N-of-M of the current |w| along I; the backward passes
  the dense gradient plus decay * (1 - mask) * w to the dense weights."""
  _check_linear("srste_matmul", x_RxI, w_IxO)
  return x_RxI @ jnp.where(nm_mask(w_IxO, n, m, axis=0), w_IxO, 0).astype(x_RxI.dtype)


def _srste_fwd(x_RxI, w_IxO, n, m, decay):
  _check_linear("srste_matmul", x_RxI, w_IxO)
  mask_IxO = nm_mask(w_IxO, n, m, axis=0)
  y = x_RxI @ jnp.where(mask_IxO, w_IxO, 0).astype(x_RxI.dtype)
  return y, (x_RxI, w_IxO, mask_IxO)


def _srste_bwd(n, m, decay, res, dy_RxO):
  x_RxI, w_IxO, mask_IxO = res
  dx_RxI = dy_RxO @ jnp.where(mask_IxO, w_IxO, 0).T.astype(dy_RxO.dtype)
  dw_IxO = x_RxI.T @ dy_RxO + decay * jnp.where(mask_IxO, 0, w_IxO)
  return dx_RxI.astype(x_RxI.dtype), dw_IxO.astype(w_IxO.dtype)


srste_matmul.defvjp(_srste_fwd, _srste_bwd)


# ---------------------------------------------------------------------------------------------
# Compressed storage: kept values plus their positions in the group, bit-packed.


@struct.dataclass
class NMCompressed:
  """An N:M sparse array as its kept values (the `axis` dimension shrunk by N/M, in group order)
  and packed in-group positions (ceil(log2 M) bits each, little-endian within a byte)."""
  values: jnp.ndarray
  packed: jnp.ndarray  # uint8
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  n: int = struct.field(pytree_node=False)
  m: int = struct.field(pytree_node=False)
  axis: int = struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.packed.nbytes)


def index_bits(m: int) -> int:
  return max(1, math.ceil(math.log2(m)))


def pack_bits(idx: jnp.ndarray, bits: int) -> jnp.ndarray:
  """Flattens small non-negative ints and packs them `bits` each into uint8 (zero-padded)."""
  per_byte = 8 // bits if 8 % bits == 0 else 1
  flat = idx.reshape(-1).astype(jnp.uint8)
  flat = jnp.pad(flat, (0, -flat.size % per_byte)).reshape(-1, per_byte)
  shifts = (jnp.arange(per_byte) * bits).astype(jnp.uint8)
  return jnp.sum(flat << shifts, axis=-1, dtype=jnp.uint32).astype(jnp.uint8)


def unpack_bits(packed: jnp.ndarray, bits: int, count: int) -> jnp.ndarray:
  chex.assert_rank(packed, 1, custom_message="unpack_bits: packed")
  per_byte = 8 // bits if 8 % bits == 0 else 1
  shifts = (jnp.arange(per_byte) * bits).astype(jnp.uint8)
  fields = (packed[:, None] >> shifts) & jnp.uint8((1 << bits) - 1)
  return fields.reshape(-1)[:count].astype(jnp.int32)


FLOAT_BITS = 24  # integers below 2**24 are exact in float32, so updates new - old stay exact


def pack_float(idx: jnp.ndarray, bits: int) -> jnp.ndarray:
  """Small non-negative ints packed `bits` each into float32 integers below 2**24: positions that
  live among the parameters and that the optimizer can overwrite exactly (p + (new - p))."""
  per = FLOAT_BITS // bits
  flat = idx.reshape(-1).astype(jnp.int32)
  flat = jnp.pad(flat, (0, -flat.size % per)).reshape(-1, per)
  return jnp.sum(flat << (jnp.arange(per) * bits), axis=-1).astype(jnp.float32)


def unpack_float(packed: jnp.ndarray, bits: int, count: int) -> jnp.ndarray:
  chex.assert_rank(packed, 1, custom_message="unpack_float: packed")
  per = FLOAT_BITS // bits
  fields = (packed.astype(jnp.int32)[:, None] >> (jnp.arange(per) * bits)) & ((1 << bits) - 1)
  return fields.reshape(-1)[:count]


def kept_positions(mask: jnp.ndarray, n: int, m: int, axis: int) -> jnp.ndarray:
  """In-group positions (..., G, n) of the kept entries of an N:M mask, in increasing order."""
  mask_GxM, _ = _grouped(mask, m, axis)
  # stable sort of "not kept" puts the n kept positions first, in their original order
  return jnp.argsort(~mask_GxM, axis=-1, stable=True)[..., :n]


def gather_kept(w: jnp.ndarray, pos_GxN: jnp.ndarray, m: int, axis: int) -> jnp.ndarray:
  """The kept values of w at `pos` (from kept_positions), with `axis` shrunk by N/M."""
  w_GxM, moved_shape = _grouped(w, m, axis)
  chex.assert_shape(pos_GxN, (*w_GxM.shape[:-1], None), custom_message="gather_kept: pos_GxN")
  kept = jnp.take_along_axis(w_GxM, pos_GxN, axis=-1)
  return jnp.moveaxis(kept.reshape(*moved_shape[:-1], -1), -1, axis)


def scatter_kept(values: jnp.ndarray, pos_GxN: jnp.ndarray, n: int, m: int,
                 axis: int) -> jnp.ndarray:
  """Inverse of gather_kept: a dense array with `values` at the kept positions, zeros elsewhere."""
  v = jnp.moveaxis(values, axis, -1)
  chex.assert_is_divisible(v.shape[-1], n, custom_message="scatter_kept: values along axis")
  chex.assert_shape(pos_GxN, (*v.shape[:-1], v.shape[-1] // n, n),
                    custom_message="scatter_kept: pos_GxN")
  v_GxN = v.reshape(*v.shape[:-1], v.shape[-1] // n, n)
  onehot_GxNxM = jax.nn.one_hot(pos_GxN, m, dtype=values.dtype)
  dense_GxM = jnp.einsum("...GN,...GNM->...GM", v_GxN, onehot_GxNxM)
  return jnp.moveaxis(dense_GxM.reshape(*v.shape[:-1], -1), -1, axis)


def compress_nm(w: jnp.ndarray, n: int, m: int, axis: int = 0,
                mask: jnp.ndarray | None = None) -> NMCompressed:
  """Kept values and packed positions of w under `mask` (default: nm_mask of w)."""
  if mask is not None:
    chex.assert_equal_shape([w, mask], custom_message="compress_nm: mask")
  mask = nm_mask(w, n, m, axis) if mask is None else mask
  pos = kept_positions(mask, n, m, axis)
  return NMCompressed(gather_kept(w, pos, m, axis), pack_bits(pos, index_bits(m)),
                      tuple(w.shape), n, m, axis)


def unpack_positions(packed: jnp.ndarray, shape: tuple[int, ...], n: int, m: int,
                     axis: int) -> jnp.ndarray:
  """The kept positions (..., G, n) of an N:M array of `shape` from their packed bits."""
  chex.assert_rank(packed, 1, custom_message="unpack_positions: packed")
  moved = list(shape)
  moved.append(moved.pop(axis))
  groups = (*moved[:-1], moved[-1] // m, n)
  return unpack_bits(packed, index_bits(m), math.prod(groups)).reshape(groups)


def kept_mask(pos_GxN: jnp.ndarray, shape: tuple[int, ...], n: int, m: int,
              axis: int) -> jnp.ndarray:
  """The boolean N:M mask of `shape` whose kept entries are at `pos`."""
  kept_shape = list(shape)
  kept_shape[axis] = shape[axis] * n // m
  return scatter_kept(jnp.ones(kept_shape, jnp.float32), pos_GxN, n, m, axis) != 0


def decompress_nm(c: NMCompressed) -> jnp.ndarray:
  """The dense array (zeros at pruned entries) of a compressed one."""
  pos = unpack_positions(c.packed, c.shape, c.n, c.m, c.axis)
  return scatter_kept(c.values, pos, c.n, c.m, c.axis)

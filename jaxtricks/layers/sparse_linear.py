"""N:M sparse `Linear` layers for SLoPe (arXiv 2405.16325) and SR-STE (arXiv 2102.04010), with
SLoPe's lazy low-rank adapters: y = x W_sparse + (x L) R / r.

The kernel keeps the dense layer's shape and logical axes; the N:M groups run along the flattened
input axes. A SLoPe kernel is pruned at initialisation by the magnitude of its random draw, and
its pruned entries are exactly zero from then on: the optimizer (jaxtricks.train.sparse_optimizer)
only updates kept entries, so the static mask is recovered as `nm_mask(kernel)` at every step and
compressed storage needs no separate mask. SR-STE kernels stay dense and re-select every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.layers.linear import Linear, default_init
from jaxtricks.ops import sparsity

METHODS = ("slope", "srste")
ADAPTER_NAMES = ("adapter_l", "adapter_r")


@dataclasses.dataclass(frozen=True)
class NMSpec:
  """How a linear layer is sparsified. rank > 0 adds the low-rank adapter L (I, r), R (r, O)."""
  n: int = 2
  m: int = 4
  method: str = "slope"       # slope | srste
  rescale: bool = False       # multiply the kept weights by M / N (keeps the dense variance)
  decay: float = 2e-4         # SR-STE's lambda_w
  rank: int = 0
  backend: str = "masked_dense"
  double_prune: bool = True   # SLoPe's pruned input gradient; False: exact (ablation)
  mask_change_freq: int = 1   # > 1: the transposed mask C is a parameter the optimizer refreshes


@struct.dataclass
class NMLeaf:
  """Sown at init into the `nm_spec` collection for each sparse kernel: its N:M pattern and which
  axis of the stored kernel holds the groups (no array leaves, so it survives jax.eval_shape)."""
  n: int = struct.field(pytree_node=False)
  m: int = struct.field(pytree_node=False)
  axis: int = struct.field(pytree_node=False)

  def matrix(self, w: jnp.ndarray) -> jnp.ndarray:
    """The stored kernel as the (I, O) matrix of the layer's matmul (groups along I)."""
    return w.reshape(math.prod(w.shape[:self.axis + 1]), -1)


def pruned_init(init, n: int, m: int, in_ndim: int):
  """A kernel initializer whose draw is pruned N:M along the flattened input axes by magnitude."""
  def wrapped(key, shape, dtype=jnp.float32):
    w = init(key, shape, dtype)
    n_in = math.prod(shape[:in_ndim])
    w_IxO = w.reshape(n_in, -1)
    return jnp.where(sparsity.nm_mask(w_IxO, n, m, axis=0), w_IxO, 0).reshape(shape)
  return wrapped


class SparseLinear(Linear):
  """`Linear` with an N:M sparse kernel (see NMSpec) and an optional low-rank adapter."""
  spec: NMSpec = NMSpec()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    spec = self.spec
    in_shape = x.shape[-self.in_ndim:]
    n_in, n_out = math.prod(in_shape), math.prod(self.features)
    if in_shape[-1] % spec.m:
      raise ValueError(f"{self.name}: input axis of size {in_shape[-1]} is not divisible by "
                       f"the N:M group size {spec.m}")
    init = default_init(self.std)
    if spec.method == "slope":
      init = pruned_init(init, spec.n, spec.m, self.in_ndim)
    if self.is_initializing():
      self.sow("nm_spec", "kernel", NMLeaf(spec.n, spec.m, self.in_ndim - 1))
    kernel = self.make_kernel(in_shape, init)
    dtype = resolve_dtype(self.dtype)
    batch_shape = x.shape[:x.ndim - self.in_ndim]
    x_RxI = x.astype(dtype).reshape(-1, n_in)
    w_IxO = kernel.reshape(n_in, n_out)
    if spec.method == "slope":
      # The static mask: pruned entries are exactly zero, kept ones never are (measure zero).
      row_mask_IxO = jax.lax.stop_gradient(sparsity.nm_mask(w_IxO, spec.n, spec.m, axis=0))
      scale = spec.m / spec.n if spec.rescale else 1.0
      col_mask_IxO = None
      if spec.double_prune and spec.mask_change_freq > 1:
        col_mask_IxO = self._held_col_mask(w_IxO)
      y_RxO = sparsity.slope_matmul(x_RxI, w_IxO, row_mask_IxO, spec.n, spec.m, scale,
                                    spec.backend, spec.double_prune, col_mask_IxO)
    else:
      y_RxO = sparsity.srste_matmul(x_RxI, w_IxO, spec.n, spec.m, spec.decay)
    if spec.rank:
      pdtype = resolve_dtype(self.param_dtype)
      # L and R start at zero and the adapter branch is skipped while L is zero: the optimizer
      # draws L at the switch step and R is still zero then, so switching the adapters on does not
      # change the output (SLoPe sec. 3.2) and they cost nothing before it (sparse_optimizer).
      l_IxR = self.param("adapter_l", nn.initializers.zeros, (n_in, spec.rank), pdtype)
      r_RxO = self.param("adapter_r", nn.initializers.zeros, (spec.rank, n_out), pdtype)
      adapter = lambda x: (x @ l_IxR.astype(dtype)) @ r_RxO.astype(dtype) / spec.rank  # noqa: E731
      off = lambda x: jnp.zeros((x.shape[0], n_out), dtype)  # noqa: E731
      y_RxO = y_RxO + jax.lax.cond(jnp.any(l_IxR != 0), adapter, off, x_RxI).astype(y_RxO.dtype)
    return y_RxO.reshape(*batch_shape, *self.features)

  def _held_col_mask(self, w_IxO: jnp.ndarray) -> jnp.ndarray:
    """C held between refreshes: the `col_positions` parameter (no gradient; the optimizer
    overwrites it every mask_change_freq steps, see jaxtricks.train.sparse_optimizer)."""
    n, m = self.spec.n, self.spec.m
    packed = self.param("col_positions", lambda _: col_positions(w_IxO, n, m))
    n_in, n_out = w_IxO.shape
    pos = sparsity.unpack_float(jax.lax.stop_gradient(packed), sparsity.index_bits(m),
                                n_in * n_out // m * n).reshape(n_in, n_out // m, n)
    return sparsity.kept_mask(pos, (n_in, n_out), n, m, axis=1)


def col_positions(w_IxO: jnp.ndarray, n: int, m: int) -> jnp.ndarray:
  """The transposed N:M mask C of a (row-pruned) kernel, as float-packed kept positions."""
  mask_IxO = sparsity.nm_mask(w_IxO, n, m, axis=1)
  pos = sparsity.kept_positions(mask_IxO, n, m, axis=1)
  return sparsity.pack_float(pos, sparsity.index_bits(m))


def merge_adapters(kernel: jnp.ndarray, l_IxR: jnp.ndarray, r_RxO: jnp.ndarray,
                   spec: NMSpec) -> jnp.ndarray:
  """The dense kernel W_sparse * scale + L R / r of a layer, for inference (no longer N:M)."""
  scale = spec.m / spec.n if spec.rescale else 1.0
  n_in = l_IxR.shape[0]
  w_IxO = kernel.reshape(n_in, -1)
  if spec.method == "srste":
    w_IxO = jnp.where(sparsity.nm_mask(w_IxO, spec.n, spec.m, axis=0), w_IxO, 0)
  return (w_IxO * scale + l_IxR @ r_RxO / spec.rank).reshape(kernel.shape)


def linear_class(spec: NMSpec | None):
  """The projection class a layer uses: `Linear`, or `SparseLinear` bound to `spec`."""
  if spec is None:
    return Linear
  return functools.partial(SparseLinear, spec=spec)

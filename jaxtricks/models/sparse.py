"""Whole-model tools for N:M sparse Transformers (SLoPe, arXiv 2405.16325): finding the sparse
kernels, compressed storage of the parameters, merged adapters for inference, and the
measurements the paper reports (non-zero parameters, extra zeros of the double-pruned backward,
bytes of weights and train state)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtricks.layers.sparse_linear import NMLeaf, NMSpec, merge_adapters
from jaxtricks.ops import sparsity

Path = tuple[str, ...]


def nm_leaves(model: nn.Module, seq_len: int = 8) -> dict[Path, NMLeaf]:
  """{parameter path: NMLeaf} of every N:M sparse kernel of `model` (from the `nm_spec`
  collection its sparse layers sow at init, under jax.eval_shape: nothing is allocated)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  flat = traverse_util.flatten_dict(dict(variables.get("nm_spec", {})))
  return {path: sown[0] for path, sown in flat.items()}


def effective_kernel(w: jnp.ndarray, leaf: NMLeaf) -> jnp.ndarray:
  """The weights the forward pass multiplies by: w at its N:M mask (a SLoPe kernel already is)."""
  return jnp.where(sparsity.nm_mask(w, leaf.n, leaf.m, leaf.axis), w, 0)


def compress_params(params: Any, leaves: dict[Path, NMLeaf]) -> Any:
  """params with every sparse kernel replaced by its NMCompressed form (values + packed
  positions): an orbax-savable pytree for inference and checkpoints."""
  flat = traverse_util.flatten_dict(params)
  for path, leaf in leaves.items():
    flat[path] = sparsity.compress_nm(flat[path], leaf.n, leaf.m, leaf.axis)
  return traverse_util.unflatten_dict(flat)


def decompress_params(tree: Any) -> Any:
  """Inverse of compress_params: dense kernels with zeros at the pruned entries."""
  is_c = lambda x: isinstance(x, sparsity.NMCompressed)  # noqa: E731
  return jax.tree.map(lambda x: sparsity.decompress_nm(x) if is_c(x) else x, tree, is_leaf=is_c)


def merged_params(params: Any, leaves: dict[Path, NMLeaf], spec_of: Any) -> Any:
  """Adapters folded in: kernel <- W_sparse * scale + L R / r (dense), adapters removed.
  `spec_of(path)` gives the layer's NMSpec. The model to apply them to is the same config with
  sparsity 'none' (and no rescaling: it is folded in too)."""
  flat = traverse_util.flatten_dict(params)
  for path in leaves:
    module = path[:-1]
    spec: NMSpec = spec_of(path)
    l_key, r_key = (*module, "adapter_l"), (*module, "adapter_r")
    if l_key in flat:
      flat[path] = merge_adapters(flat[path], flat.pop(l_key), flat.pop(r_key), spec)
    else:
      scale = spec.m / spec.n if spec.rescale else 1.0
      flat[path] = effective_kernel(flat[path], leaves[path]) * scale
  return traverse_util.unflatten_dict(flat)


def nonzero_params(params: Any, leaves: dict[Path, NMLeaf]) -> int:
  """Non-zero parameters the forward pass uses (SR-STE's dense kernels counted at their mask)."""
  flat = traverse_util.flatten_dict(params)
  total = 0
  for path, value in flat.items():
    if path in leaves:
      value = effective_kernel(value, leaves[path])
    total += int(np.count_nonzero(np.asarray(value)))
  return total


def extra_zero_fraction(params: Any, leaves: dict[Path, NMLeaf]) -> float:
  """Fraction of all sparse-kernel entries that the transposed pruning of the backward removes
  from the forward's weights (the same double_prune the custom VJP applies)."""
  flat = traverse_util.flatten_dict(params)
  removed = total = 0
  for path, leaf in leaves.items():
    w_IxO = leaf.matrix(flat[path])
    mask_IxO = sparsity.nm_mask(w_IxO, leaf.n, leaf.m, axis=0)
    kept = int(jnp.count_nonzero(jnp.where(mask_IxO, w_IxO, 0)))
    removed += kept - int(jnp.count_nonzero(sparsity.double_prune(w_IxO, mask_IxO, leaf.n,
                                                                  leaf.m)))
    total += w_IxO.size
  return removed / total if total else 0.0


def tree_bytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def spec_of_path(config) -> Any:
  """path -> NMSpec of that kernel's layer under a ModelConfig (blocks by index, multi-token
  heads as the last block)."""
  def spec_of(path: Path) -> NMSpec:
    top = path[0]
    layer = int(top.split("_")[1]) if top.startswith("block_") else config.depth - 1
    target = next(p for p in path if p in ("attn", "mlp"))
    return config.projection.spec(config, layer, target)
  return spec_of


def bytes_at(tree: Any, paths: set[Path]) -> int:
  """Bytes of the leaves of `tree` (params, or an optimizer state holding trees like them) whose
  dict keys end with one of `paths`; an NMCompressed node counts whole."""
  total = 0
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
    if any(keys[-len(p):] == p for p in paths):
      total += np.asarray(leaf).nbytes
  return total


def static_masks_held(params: Any, positions: Any, leaves: dict[Path, NMLeaf]) -> bool:
  """Whether every sparse kernel is non-zero exactly at the kept positions the optimizer recorded
  at initialisation (`NMSparseState.positions`): the forward mask never changed."""
  flat, flat_pos = traverse_util.flatten_dict(params), traverse_util.flatten_dict(positions)
  for path, leaf in leaves.items():
    w = jnp.asarray(flat[path])
    pos = sparsity.unpack_positions(jnp.asarray(flat_pos[path]), w.shape, leaf.n, leaf.m,
                                    leaf.axis)
    if not bool(jnp.all(sparsity.kept_mask(pos, w.shape, leaf.n, leaf.m, leaf.axis)
                        == (w != 0))):
      return False
  return True

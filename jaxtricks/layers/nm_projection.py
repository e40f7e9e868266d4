"""N:M sparse projection components: SLoPe (Mozaffari et al. 2024, arXiv 2405.16325) and SR-STE
(Zhou et al. 2021, arXiv 2102.04010). Both prune the attention and/or MLP projections of every
block (or of the blocks named in `blocks`) with the `SparseLinear` layer; the embedding and the
output head stay dense. SLoPe's optimizer transforms are registered in
jaxtricks.train.sparse_optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import traverse_util

from jaxtricks.errors import ConfigError
from jaxtricks.layers.linear import DenseProjection, Linear
from jaxtricks.layers.sparse_linear import NMSpec, SparseLinear
from jaxtricks.registry import Component, register

TARGETS = ("attn", "mlp")


@dataclasses.dataclass(frozen=True)
class NMProjection(Component):
  n: int = 2
  m: int = 4
  blocks: tuple[str, ...] = ()   # per block "N:M" or "dense"; () = n:m everywhere
  targets: tuple[str, ...] = TARGETS

  def block_nm(self, layer: int) -> tuple[int, int] | None:
    """(N, M) of block `layer`'s pruned projections, or None when it is dense."""
    if not self.blocks:
      return self.n, self.m
    entry = self.blocks[layer].strip().lower()
    if entry == "dense":
      return None
    try:
      n, m = (int(v) for v in entry.split(":"))
    except ValueError:
      raise ConfigError(f"model.projection.blocks[{layer}]={entry!r} is not 'N:M' or 'dense'"
                        ) from None
    return n, m

  def spec(self, model: Any, layer: int, where: str) -> NMSpec | None:
    """The NMSpec of block `layer`'s `where` ('attn' or 'mlp') projections, None if dense."""
    raise NotImplementedError

  def factory(self, model: Any, layer: int, where: str) -> Callable[..., nn.Module]:
    spec = self.spec(model, layer, where)
    return Linear if spec is None else functools.partial(SparseLinear, spec=spec)

  def base(self):
    return DenseProjection()

  def merged(self, model: Any, params: dict) -> tuple[Component, dict]:
    """Dense kernels equal to what the forward multiplies by (masked, rescaled, adapters added);
    SLoPe's held transposed masks dropped."""
    from jaxtricks.models import sparse  # noqa: PLC0415 (models import layers)
    from jaxtricks.models.transformer import Transformer  # noqa: PLC0415

    leaves = sparse.nm_leaves(Transformer(model))
    flat = traverse_util.flatten_dict(
        sparse.merged_params(params, leaves, sparse.spec_of_path(model)))
    flat = {p: v for p, v in flat.items() if p[-1] != "col_positions"}
    return DenseProjection(), traverse_util.unflatten_dict(flat)

  def adopt(self, model: Any, params: dict) -> dict:
    """Plain pretrained kernels pruned to this model's N:M by magnitude (one-shot pruning)."""
    from jaxtricks.models import sparse  # noqa: PLC0415
    from jaxtricks.models.transformer import Transformer  # noqa: PLC0415

    flat = traverse_util.flatten_dict(params)
    for path, leaf in sparse.nm_leaves(Transformer(model)).items():
      flat[path] = sparse.effective_kernel(flat[path], leaf)
    return traverse_util.unflatten_dict(flat)

  def validate(self, model: Any) -> None:
    if self.blocks and len(self.blocks) != model.depth:
      raise ConfigError(f"model.projection.blocks has {len(self.blocks)} entries for "
                        f"{model.depth} blocks")
    if set(self.targets) - set(TARGETS) or not self.targets:
      raise ConfigError(f"model.projection.targets={self.targets} must be a non-empty subset of "
                        f"{', '.join(TARGETS)}")
    if "mlp" in self.targets and not model.mlp.has_projections:
      raise ConfigError(f"model.projection.targets includes 'mlp' but model.mlp="
                        f"{model.mlp.kind!r} has no linear projections to prune; use "
                        "--model.projection.targets=attn")
    dims = {"model.d_model": model.d_model, "the head dimension": model.dim_per_head,
            "the MLP width": model.mlp.width(model)}
    where = "model.projection.blocks" if self.blocks else "model.projection.n/m"
    for layer in range(model.depth):
      nm = self.block_nm(layer)
      if nm is None:
        continue
      n, m = nm
      if not 0 < n <= m or m > 16:
        raise ConfigError(f"{where}: N:M sparsity needs 0 < N <= M <= 16, got N={n}, M={m}")
      for what, size in dims.items():
        if size % m:
          raise ConfigError(f"{what}={size} is not divisible by the N:M group size M={m}")


@register("projection", "slope")
@dataclasses.dataclass(frozen=True)
class SlopeProjection(NMProjection):
  """Static masks from the initial draw, the double-pruned backward, lazy low-rank adapters."""
  rescale: bool = False          # scale kept weights by M/N
  backward: str = "double"       # double (pruned input gradient) | exact (ablation)
  mask_change_freq: int = 1      # recompute the transposed mask every k steps (1: each step)
  adapter_rank: int = 0          # lazy low-rank adapters (0: none) on every pruned linear
  adapter_start: float = 0.99    # fraction of train.steps after which the adapters train

  def spec(self, model, layer, where):
    nm = self.block_nm(layer)
    if nm is None or where not in self.targets:
      return None
    return NMSpec(nm[0], nm[1], "slope", self.rescale, rank=self.adapter_rank,
                  double_prune=self.backward == "double", mask_change_freq=self.mask_change_freq)

  def validate(self, model):
    super().validate(model)
    if self.mask_change_freq < 1 or self.backward not in ("double", "exact"):
      raise ConfigError(f"model.projection.mask_change_freq={self.mask_change_freq} must be >= 1 "
                        f"and model.projection.backward={self.backward!r} double or exact")
    if self.adapter_rank < 0 or not 0 <= self.adapter_start <= 1:
      raise ConfigError(f"model.projection.adapter_rank={self.adapter_rank} must be >= 0 and "
                        f"model.projection.adapter_start={self.adapter_start} within [0, 1]")


@register("projection", "srste")
@dataclasses.dataclass(frozen=True)
class SRSTEProjection(NMProjection):
  """Masks re-selected every step from dense weights; pruned weights decay by `decay`."""
  decay: float = 2e-4            # SR-STE's lambda_w

  def spec(self, model, layer, where):
    nm = self.block_nm(layer)
    if nm is None or where not in self.targets:
      return None
    return NMSpec(nm[0], nm[1], "srste", decay=self.decay)

"""SPP: sparsity-preserved parameter-efficient fine-tuning (Lu et al. 2024, arXiv 2405.16057).

For a frozen N:M sparse kernel W (d_in, d_out), learnable W_a (r, d_in) and W_b (d_out,):

    W' = W + s W * (R(W_a) diag(W_b)),   R(W_a)[j, i] = W_a[g(i), j],  g(i) = floor(i r / d_out)

(`*` element-wise; R repeats each row of W_a over a group of d_out / r outputs, the paper's
repeat_interleave), s = 2 as in the authors' fine-tuning script (lora_alpha 16 / lora_r 8);
W_a is drawn like LoRA's A (kaiming-uniform), W_b starts at zero, so W' = W at step 0. Every
term of W' carries a factor W_ij: the pruned entries stay exactly zero during training and after
merging, so the N:M pattern and ratio hold. The update is formed as the (d_in, d_out) matrix and
applied in one matmul (at our widths cheaper than the authors' memory-saving per-group form).
Pretrained kernels that are not N:M are refused (`adopt`); without --init_from the frozen kernel
is drawn N:M pruned, as SLoPe's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from jaxtricks.errors import ConfigError
from jaxtricks.layers.adapter import AdaptedLinear, AdapterProjection, layer_dims
from jaxtricks.layers.linear import default_init
from jaxtricks.layers.lora import uniform_fan_in
from jaxtricks.layers.sparse_linear import pruned_init
from jaxtricks.ops import sparsity
from jaxtricks.registry import register


def spp_factor(a_GxI: jnp.ndarray, b_O: jnp.ndarray, scale: float) -> jnp.ndarray:
  """1 + s R(W_a) diag(W_b): the (I, O) factor that multiplies W element-wise."""
  n_out = b_O.shape[0]
  groups_O = jnp.arange(n_out) * a_GxI.shape[0] // n_out
  return 1.0 + scale * a_GxI[groups_O].T * b_O[None, :]


@register("projection", "spp")
@dataclasses.dataclass(frozen=True)
class SPPProjection(AdapterProjection):
  """Sparsity-preserving residual adapters on the `targets` projections of an N:M model."""
  rank: int = 16                 # rows of W_a (the authors' code fixes 16)
  scale: float = 2.0
  n: int = 2                     # the pretrained model's N:M pattern
  m: int = 4
  param_names: ClassVar[tuple[str, ...]] = ("spp_a", "spp_b")

  def kernel_init(self, std, in_ndim):
    return pruned_init(default_init(std), self.n, self.m, in_ndim)

  def forward(self, module: AdaptedLinear, x_RxI, w_IxO):
    n_in, n_out = w_IxO.shape
    a_GxI = module.adapter_param("spp_a", uniform_fan_in_rows, (self.rank, n_in))
    b_O = module.adapter_param("spp_b", nn.initializers.zeros, (n_out,))
    return x_RxI @ (w_IxO * spp_factor(a_GxI, b_O, self.scale))

  def delta_weight(self, params, w_IxO):
    return w_IxO * (spp_factor(params["spp_a"], params["spp_b"], self.scale) - 1.0)

  def adopt(self, model: Any, params: dict) -> dict:
    flat = traverse_util.flatten_dict(params)
    for path, w in flat.items():
      if path[-1] != "kernel" or len(path) < 2 or path[-2] not in self.targets:
        continue
      w_IxO = self._matrix(w, path[:-1])
      if not bool(jnp.all(sparsity.nm_mask(w_IxO, self.n, self.m, axis=0) | (w_IxO == 0))):
        density = float(jnp.mean(w_IxO != 0))
        raise ConfigError(
            f"model.projection=spp needs an N:M sparse pretrained model (SPP keeps its "
            f"sparsity): {'/'.join(path)} is not {self.n}:{self.m} (density {density:.2f}); "
            f"pretrain with --model.projection=slope, or set --model.projection.n/m")
    return params

  def validate(self, model: Any) -> None:
    super().validate(model)
    if not 0 < self.n <= self.m:
      raise ConfigError(f"model.projection.n={self.n}, m={self.m}: need 0 < N <= M")
    for name in self.targets:
      if model.mlp.has_projections or name in ("q", "k", "v", "o"):
        n_in, n_out = layer_dims(model, name)
        if self.rank < 1 or self.rank > n_out:
          raise ConfigError(f"model.projection.rank={self.rank} must be in 1..{n_out} (the "
                            f"outputs of the {name} projection)")
        if n_in % self.m:
          raise ConfigError(f"the {name} projection's input size {n_in} is not divisible by "
                            f"the N:M group size model.projection.m={self.m}")


def uniform_fan_in_rows(key, shape, dtype=jnp.float32):
  """W_a (r, d_in): kaiming-uniform over its fan-in d_in (shape[1])."""
  return uniform_fan_in(key, shape[::-1], dtype).T

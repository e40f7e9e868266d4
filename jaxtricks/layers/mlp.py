"""SwiGLU feed-forward block (Shazeer 2020, arXiv 2002.05202): (silu(x W_g) * (x W_u)) W_o."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.layers.sparse_linear import NMSpec, linear_class


class SwiGLU(nn.Module):
  d_ff: int
  n_layers: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  sparsity: NMSpec | None = None  # N:M sparse projections (SLoPe, SR-STE)

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
    d = x_BxTxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    Linear = linear_class(self.sparsity)  # noqa: N806
    gate_BxTxF = Linear((self.d_ff,), ("embed", "mlp"), std=d ** -0.5, name="gate", **kw)(x_BxTxD)
    up_BxTxF = Linear((self.d_ff,), ("embed", "mlp"), std=d ** -0.5, name="up", **kw)(x_BxTxD)
    # Output projections scaled by 1/sqrt(2 L) keep the residual stream's variance O(1) (GPT-2).
    std = (self.d_ff * 2 * self.n_layers) ** -0.5
    return Linear((d,), ("mlp", "embed"), std=std, name="down", **kw)(
        jax.nn.silu(gate_BxTxF) * up_BxTxF)

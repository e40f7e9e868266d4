"""KAN sparsity regularisation for the KAN feed-forward blocks of a Transformer (Liu et al. 2024,
arXiv 2404.19756, eq. 2.17-2.20), as a loss term of the `kan` MLP component:

    loss += reg_lamb * (sum_layers L1 + reg_entropy * sum_layers entropy),

with each edge's magnitude in the coefficient form |w_s| mean_j |c_j| + |w_b| (no pass over
samples: a KAN block sees B x T tokens per step) and pykan's row + column entropy
(jaxtricks.models.kan_prune). Logged as `kan_reg`; `loss` stays the data term.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from jaxtricks.layers.kan import KANMLPConfig
from jaxtricks.models.kan_prune import l1_and_entropy
from jaxtricks.train.hooks import loss_term


def edge_magnitudes(params: Any) -> list[jnp.ndarray]:
  """(O, I) coefficient-form magnitudes of every KAN layer of every MLP in `params`."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  out = []
  for path in sorted(p for p in flat if p[-1] == "coef" and "mlp" in p):
    layer = path[:-1]
    mag_IxO = (jnp.abs(flat[(*layer, "w_spline")]) * jnp.mean(jnp.abs(flat[path]), axis=-1)
               + jnp.abs(flat[(*layer, "w_base")]))
    out.append(mag_IxO.T)
  return out


@loss_term(KANMLPConfig)
def kan_ffn_regularisation(mlp: KANMLPConfig, model, params, batch, train: bool):
  del model, batch, train  # the same term in training and evaluation
  if mlp.reg_lamb == 0:
    return 0.0, {}
  l1, entropy = l1_and_entropy(edge_magnitudes(params), "pykan")
  value = mlp.reg_lamb * (l1 + mlp.reg_entropy * entropy)
  return value, {"kan_reg": value}

"""Every component kind and trick loss, registered by importing its module (one line per
trick). The config parser and the stages that read component hooks import this module; nothing
else names a kind.
"""

import jaxtricks.layers.attention  # noqa: F401  attention: mha (MHA/GQA/MQA, CLA)
import jaxtricks.layers.embed  # noqa: F401  embed: token; head: linear
import jaxtricks.layers.kan  # noqa: F401  mlp: kan
import jaxtricks.layers.lckv  # noqa: F401  attention: lckv (Layer-Condensed KV)
import jaxtricks.layers.linear  # noqa: F401  projection: dense
import jaxtricks.layers.linear_attention  # noqa: F401  attention: linear (SLAB, causal)
import jaxtricks.layers.lora  # noqa: F401  projection: lora
import jaxtricks.layers.medusa  # noqa: F401  mtp: medusa
import jaxtricks.layers.mlp  # noqa: F401  mlp: swiglu
import jaxtricks.layers.mora  # noqa: F401  projection: mora
import jaxtricks.layers.mtp  # noqa: F401  mtp: transformer, linear, sequential
import jaxtricks.layers.neftune  # noqa: F401  embed: neftune
import jaxtricks.layers.nm_projection  # noqa: F401  projection: slope, srste
import jaxtricks.layers.norm  # noqa: F401  norm: rms
import jaxtricks.layers.prepbn  # noqa: F401  norm: prepbn, affine (SLAB)
import jaxtricks.layers.spafit  # noqa: F401  projection: spafit, bitfit
import jaxtricks.layers.spp  # noqa: F401  projection: spp
import jaxtricks.models.regulariser  # noqa: F401  regulariser: none
import jaxtricks.train.cosine_reg  # noqa: F401  regulariser: cosine (Secretly Linear)
import jaxtricks.train.exact_match  # noqa: F401  train.loss: lm_exact
import jaxtricks.train.kan_ffn_reg  # noqa: F401  mlp kan: its regulariser as a loss term
import jaxtricks.train.mtp_loss  # noqa: F401  train.loss: mtp, mtp_naive
import jaxtricks.train.sparse_optimizer  # noqa: F401  slope's optimizer transforms

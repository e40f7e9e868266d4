"""The cosine-similarity regulariser of "Your Transformer is Secretly Linear" (Razzhigaev et al.
2024, arXiv 2405.12250, section on pretraining), the `cosine` kind of the `regulariser` slot:

    pull:  objective += weight * mean_i mean_tokens (1 - cos(h_i, h_(i+1))),
    push:  objective += weight * mean_i mean_tokens cos(h_i, h_(i+1)),

h_i the residual stream entering trunk block i and h_(i+1) the one leaving it (i = 0..L-1;
h_L before the final norm). The paper's text available to us (its abstract) says only that a
cosine-similarity-based term between embeddings of consecutive layers was added in pretraining
and lowered linearity; `pull` is the form our reading note recalls, `push` its opposite, both
offered because the exact form is unconfirmed. The term is computed in training only (logged as
`cos_reg`, the weighted value, and `cos_sim`, the mean cosine); evaluation and `loss` are the
data term. The states are those of the loss's own forward pass, recorded by the component's loss
context (jaxtricks.train.hooks, jaxtricks.models.block_hooks); a loss called outside it (or a
remat model) runs a deterministic forward of its own for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.models.block_hooks import recorded_blocks, without_remat
from jaxtricks.models.regulariser import Regulariser
from jaxtricks.registry import register
from jaxtricks.train.hooks import loss_context, loss_term

MODES = ("pull", "push")


def mean_cosine(states: list[tuple[jnp.ndarray, jnp.ndarray]], eps: float = 1e-8,
                weights_BxT: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean over blocks and tokens of cos(input, output) of each block, in float32."""
  total = 0.0
  for x_BxTxD, y_BxTxD in states:
    x, y = x_BxTxD.astype(jnp.float32), y_BxTxD.astype(jnp.float32)
    cos_BxT = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
                                    + eps)
    if weights_BxT is None:
      total = total + jnp.mean(cos_BxT)
    else:
      total = total + jnp.sum(cos_BxT * weights_BxT) / jnp.maximum(jnp.sum(weights_BxT), 1)
  return total / len(states)


@register("regulariser", "cosine")
@dataclasses.dataclass(frozen=True)
class CosineRegulariser(Regulariser):
  """weight * (1 - cos) (`pull`) or weight * cos (`push`) between consecutive residual streams."""
  weight: float = 0.1
  mode: str = "pull"

  def validate(self, model: Any) -> None:
    del model
    if not (math.isfinite(self.weight) and self.weight >= 0):
      raise ConfigError(f"model.regulariser.weight must be finite and >= 0, got {self.weight}")
    if self.mode not in MODES:
      raise ConfigError(f"model.regulariser.mode={self.mode!r} is unknown; valid: "
                        f"{', '.join(MODES)}")

  def term(self, cos: jnp.ndarray) -> jnp.ndarray:
    return self.weight * ((1.0 - cos) if self.mode == "pull" else cos)


_RECORDS: list[dict] = []  # the trunk states of the loss call being traced, innermost last


@loss_context(CosineRegulariser)
@contextlib.contextmanager
def record_trunk(reg: CosineRegulariser, model, train: bool) -> Iterator[None]:
  """Records the trunk blocks' states of the loss's own training forward pass (not under
  remat: values inside jax.checkpoint must not escape it)."""
  if not train or reg.weight == 0 or model.config.remat:
    yield
    return
  record: dict = {}
  _RECORDS.append(record)
  try:
    with recorded_blocks(record):
      yield
  finally:
    _RECORDS.pop()


def trunk_states(model, params, tokens_BxT) -> list[tuple[jnp.ndarray, jnp.ndarray]]:
  """(input, output) of every trunk block: recorded from the loss's forward pass when the loss
  runs in its context, else from a deterministic forward of its own."""
  depth = model.config.depth
  record = _RECORDS[-1] if _RECORDS else {}
  if set(record) != set(range(depth)):
    record = {}
    with recorded_blocks(record):
      without_remat(model).apply({"params": params}, tokens_BxT, method="hidden")
  return [record[i] for i in range(depth)]


@loss_term(CosineRegulariser)
def cosine_regularisation(reg: CosineRegulariser, model, params, batch, train: bool):
  if not train or reg.weight == 0:
    return 0.0, {}
  cos = mean_cosine(trunk_states(model, params, batch["inputs"]),
                    weights_BxT=batch.get("weights"))
  value = reg.term(cos)
  return value, {"cos_reg": value, "cos_sim": cos}

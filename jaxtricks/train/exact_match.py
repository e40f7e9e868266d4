"""The next-token loss with the exact-match metric of MoRA's memorisation task (Jiang et al. 2024,
arXiv 2405.12130), registered as `--train.loss=lm_exact` for `--data.task=uuid`
(jaxtricks.data.uuid_pairs).

The loss and its `loss` / `accuracy` metrics are exactly those of the next-token loss `lm`
(jaxtricks.train.losses), from logits computed once; `exact_match` is, among the examples of the
batch (the distinct non-zero ids of `batch['segments']` in each row), the fraction whose every
scored target is the argmax of its logits. Under teacher forcing every prefix is the true one, so
an example is all correct exactly when greedy decoding from its key reproduces its value and
newline: this is the exact match of the value given the key. It is the fraction in each batch,
averaged over batches as every metric is (a batch without examples counts 0).
"""

import jax
import jax.numpy as jnp

from jaxtricks.ops.losses import accuracy, cross_entropy
from jaxtricks.train import vocab_loss
from jaxtricks.train.hooks import register_loss, with_terms


def exact_match_counts(logits_BxTxV: jnp.ndarray, targets_BxT: jnp.ndarray,
                       segments_BxT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(examples whose scored targets are all argmax-correct, examples) as float32 scalars; an
  example is a non-zero id of segments_BxT in one row (ids are 1..T, 0: not scored)."""
  b, t = segments_BxT.shape
  wrong_BxT = jnp.argmax(logits_BxTxV, axis=-1) != targets_BxT
  scored_BxT = segments_BxT > 0
  # Example s of row r is slot r * (T + 1) + s; slot 0 of each row gathers the unscored targets.
  slot_BxT = jnp.arange(b)[:, None] * (t + 1) + segments_BxT
  count_S = jax.ops.segment_sum(scored_BxT.astype(jnp.int32).ravel(), slot_BxT.ravel(),
                                num_segments=b * (t + 1))
  wrong_S = jax.ops.segment_sum((scored_BxT & wrong_BxT).astype(jnp.int32).ravel(),
                                slot_BxT.ravel(), num_segments=b * (t + 1))
  present_S = count_S > 0
  n_exact = jnp.sum(present_S & (wrong_S == 0)).astype(jnp.float32)
  return n_exact, jnp.sum(present_S).astype(jnp.float32)


@register_loss("lm_exact")
def lm_exact_loss(model, params, batch, train: bool = False, rngs: dict | None = None
                  ) -> tuple[jnp.ndarray, dict]:
  """The `lm` loss and metrics plus `exact_match`; needs a batch with 'segments'."""
  if "segments" not in batch:
    raise ValueError("train.loss=lm_exact needs batches with 'segments' (per-example ids), "
                     "which only data.task=uuid gives")
  if vocab_loss.active(model):
    raise ValueError("train.loss=lm_exact does not split the vocabulary: use a mesh with "
                     "tensor=1 or train.loss=lm")
  logits_BxTxV = model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)
  total, count = cross_entropy(logits_BxTxV, batch["targets"], batch.get("weights"))
  correct, _ = accuracy(logits_BxTxV, batch["targets"], batch.get("weights"))
  n_exact, n_examples = exact_match_counts(logits_BxTxV, batch["targets"], batch["segments"])
  loss = total / count
  return with_terms(model, params, batch, train, loss,
                     {"loss": loss, "accuracy": correct / count,
                      "exact_match": n_exact / jnp.maximum(n_examples, 1.0)})

"""The `lm_exact` loss (jaxtricks.train.exact_match): exact match per example against a loop
reference on hand-built and random batches, and through the registered loss on a tiny Transformer,
whose loss and accuracy are exactly those of `lm`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.data.uuid_pairs import UUIDPairsTask
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train import exact_match, vocab_loss
from jaxtricks.train.losses import LOSSES

SEQ, BATCH = 24, 3


def reference(logits, targets, segments):
  """(exact examples, examples) by loops: an example is a (row, non-zero segment id) pair."""
  exact = total = 0
  for r in range(segments.shape[0]):
    for s in sorted(set(segments[r].tolist()) - {0}):
      total += 1
      exact += all(int(np.argmax(logits[r, t])) == targets[r, t]
                   for t in range(segments.shape[1]) if segments[r, t] == s)
  return exact, total


def test_hand_built_batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 8, 5)).astype(np.float32)
  pred = logits.argmax(-1)
  segments = np.array([[0, 1, 1, 1, 0, 2, 2, 0],    # example 1 all right, example 2 one wrong
                       [0, 0, 1, 1, 0, 0, 0, 0],    # one right example, then padding
                       [0, 0, 0, 0, 0, 0, 0, 0]])   # padding only
  targets = pred.copy()
  targets[0, 6] = (pred[0, 6] + 1) % 5              # the wrong character
  targets[0, 0] = targets[1, 7] = (pred[0, 0] + 1) % 5  # wrong but unscored: no effect
  n_exact, n_examples = exact_match.exact_match_counts(jnp.asarray(logits), jnp.asarray(targets),
                                                       jnp.asarray(segments))
  assert (float(n_exact), float(n_examples)) == (2.0, 3.0) == reference(logits, targets, segments)


def test_random_batches_match_the_reference():
  rng = np.random.default_rng(1)
  counts = jax.jit(exact_match.exact_match_counts)
  for _ in range(5):
    logits = rng.normal(size=(4, 12, 3)).astype(np.float32)
    targets = np.where(rng.random((4, 12)) < 0.85, logits.argmax(-1), rng.integers(0, 3, (4, 12)))
    segments = np.zeros((4, 12), np.int32)
    for r in range(4):  # up to 4 examples of 1..2 scored targets, with gaps
      t, s = int(rng.integers(0, 2)), 1
      while t < 11 and s <= 4:
        n = int(rng.integers(1, 3))
        segments[r, t:t + n] = s
        t, s = t + n + int(rng.integers(0, 2)), s + 1
    got = counts(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(segments))
    assert tuple(float(x) for x in got) == reference(logits, targets, segments)


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig(d_model=16, n_layers=1, attention=AttentionConfig(n_heads=2))
  model = Transformer(cfg)
  # Parameters drawn with numpy from the shapes (compiling model.init is the slow part).
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1, 4), jnp.int32)))["params"]
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
  return model, params


def test_through_the_registered_loss(tiny):
  model, params = tiny
  task = UUIDPairsTask(n_pairs=5, key_chars=3, value_chars=3)  # 8-byte examples, 3 a row
  batch = task.eval_batches(SEQ, BATCH, 1)[0]                  # rows 3 and 2 examples, padding
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(batch["inputs"])))
  # Targets set to the model's predictions on examples (0, 1) and (1, 2): those two are exact.
  targets = batch["targets"].copy()
  for r, s in ((0, 1), (1, 2)):
    hit = batch["segments"][r] == s
    targets[r, hit] = logits[r].argmax(-1)[hit]
  batch = {**batch, "targets": targets}
  loss_fn = jax.jit(lambda p, b: LOSSES["lm_exact"](model, p, b))
  loss, metrics = loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
  lm_loss, lm_metrics = LOSSES["lm"](model, params, {k: jnp.asarray(v) for k, v in batch.items()})
  exact, total = reference(logits, targets, batch["segments"])
  assert total == 5 and exact >= 2
  np.testing.assert_allclose(float(metrics["exact_match"]), exact / total, rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(lm_loss), rtol=1e-5)
  assert set(metrics) == {"loss", "accuracy", "exact_match"}
  for k in ("loss", "accuracy"):
    np.testing.assert_allclose(float(metrics[k]), float(lm_metrics[k]), rtol=1e-5)


def test_batches_without_segments_and_split_vocabularies_are_refused(tiny, monkeypatch):
  model, params = tiny
  batch = {k: jnp.asarray(v) for k, v in
           UUIDPairsTask(n_pairs=2, key_chars=3, value_chars=3).train_batch(0, 0, 1, 8).items()}
  plain = {k: v for k, v in batch.items() if k != "segments"}
  with pytest.raises(ValueError, match="needs batches with 'segments'.*data.task=uuid"):
    LOSSES["lm_exact"](model, params, plain)
  monkeypatch.setattr(vocab_loss, "active", lambda m: True)
  with pytest.raises(ValueError, match="does not split the vocabulary"):
    LOSSES["lm_exact"](model, params, batch)

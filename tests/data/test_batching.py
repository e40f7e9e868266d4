"""Deterministic batches: a pure function of (seed, step); process slices of one global batch."""

import chex
import numpy as np
import pytest

from jaxtricks.data.batching import eval_batches, train_batch, window_batch

# Distinct token values, so that a window's content tells where it starts.
TOKENS = np.arange(5000, dtype=np.int64)
SEQ, BATCH = 16, 8


def starts(batch):
  return batch["inputs"][:, 0]


def assert_windows(batch, tokens=TOKENS, seq=SEQ):
  inputs, targets = batch["inputs"], batch["targets"]
  chex.assert_equal_shape([inputs, targets])
  chex.assert_axis_dimension(inputs, 1, seq)
  chex.assert_type([inputs, targets], np.int32)
  for row_in, row_tg in zip(inputs, targets, strict=True):
    o = int(row_in[0])
    np.testing.assert_array_equal(row_in, tokens[o:o + seq])
    np.testing.assert_array_equal(row_tg, tokens[o + 1:o + seq + 1])  # shifted by one


def test_window_batch_targets_are_inputs_shifted_by_one():
  tokens = np.frombuffer(b"hello world, hello jax", np.uint8)
  batch = window_batch(tokens, np.array([0, 6, 13]), 5)
  assert [bytes(r.astype(np.uint8)) for r in batch["inputs"]] == [b"hello", b"world", b"hello"]
  assert [bytes(r.astype(np.uint8)) for r in batch["targets"]] == [b"ello ", b"orld,", b"ello "]


def test_train_batch_is_a_pure_function_of_seed_and_step():
  a = train_batch(TOKENS, SEQ, BATCH, seed=3, step=17)
  b = train_batch(TOKENS.copy(), SEQ, BATCH, seed=3, step=17)
  train_batch(TOKENS, SEQ, BATCH, seed=3, step=5)  # no hidden state between calls
  c = train_batch(TOKENS, SEQ, BATCH, seed=3, step=17)
  for other in (b, c):
    chex.assert_trees_all_equal((a["inputs"], a["targets"]), (other["inputs"], other["targets"]))
  assert_windows(a)


def test_train_batches_differ_across_steps_and_seeds():
  seen = {tuple(starts(train_batch(TOKENS, SEQ, BATCH, seed=0, step=s))) for s in range(20)}
  assert len(seen) == 20
  assert not np.array_equal(starts(train_batch(TOKENS, SEQ, BATCH, seed=0, step=4)),
                            starts(train_batch(TOKENS, SEQ, BATCH, seed=1, step=4)))


def test_train_windows_cover_the_whole_range_and_stay_inside():
  first = [starts(train_batch(TOKENS, SEQ, BATCH, seed=0, step=s)) for s in range(300)]
  first = np.concatenate(first)
  assert first.min() >= 0 and first.max() + SEQ + 1 <= len(TOKENS)
  assert first.min() < 100 and first.max() > len(TOKENS) - SEQ - 100  # roughly uniform
  tiny = np.arange(SEQ + 1)  # exactly one window fits
  assert_windows(train_batch(tiny, SEQ, 4, seed=0, step=0), tokens=tiny)


@pytest.mark.parametrize("count", [2, 3, 8])
def test_process_slices_concatenate_to_the_global_batch(count):
  whole = train_batch(TOKENS, SEQ, BATCH, seed=7, step=9)
  parts = [train_batch(TOKENS, SEQ, BATCH, seed=7, step=9, process_index=i, process_count=count)
           for i in range(count)]
  chex.assert_trees_all_equal({k: np.concatenate([p[k] for p in parts]) for k in whole}, whole)


def test_eval_batches_are_fixed_evenly_spaced_and_sliced_per_process():
  batches = eval_batches(TOKENS, SEQ, 4, 3)
  assert len(batches) == 3
  for b in batches:
    assert_windows(b)
  offsets = np.concatenate([starts(b) for b in batches])
  assert offsets[0] == 0 and offsets[-1] == len(TOKENS) - SEQ - 1  # from the start to the end
  assert np.all(np.diff(offsets) > 0)
  spacing = np.diff(offsets)
  assert spacing.max() - spacing.min() <= 1
  again = eval_batches(TOKENS, SEQ, 4, 3)
  chex.assert_trees_all_equal([b["inputs"] for b in batches], [c["inputs"] for c in again])
  halves = [eval_batches(TOKENS, SEQ, 4, 3, process_index=i, process_count=2) for i in range(2)]
  for j in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][j]["inputs"], halves[1][j]["inputs"]]), batches[j]["inputs"])

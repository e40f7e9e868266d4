"""MoRA's memorisation task (jaxtricks.data.uuid_pairs): the fixed pairs against a naive re-draw,
batches decoded back to their text, segments against weights, held-out batches that hold every
pair once in order, determinism in (seed, step), process slicing, bad options."""

import re

import chex
import numpy as np
import pytest

from jaxtricks.data.corpus import DataConfig
from jaxtricks.data.sources import make_source
from jaxtricks.data.synthetic import TASKS, make_task
from jaxtricks.data.uuid_pairs import UUIDPairsTask
from jaxtricks.errors import ConfigError

SEQ, BATCH = 64, 4
TASK = UUIDPairsTask(n_pairs=40, key_chars=6, value_chars=5)  # L = 13: 5 examples a row


def window_text(batch, row):
  window = list(batch["inputs"][row]) + [int(batch["targets"][row, -1])]
  return bytes(window).decode("ascii")


def decode(task, batch, row):
  """The row's examples as (key, value), checking its text, weights and segments on the way."""
  text = window_text(batch, row)
  body = text.rstrip("\0")
  assert len(text) == SEQ + 1 and "\0" not in body
  lines = body.split("\n")
  assert lines[-1] == ""  # whole examples only
  examples, scored, segment = [], np.zeros(SEQ + 1), np.zeros(SEQ + 1, int)
  offset = 0
  for j, line in enumerate(lines[:-1]):
    key, value = line.split(":")
    assert re.fullmatch(f"[0-9a-f]{{{task.key_chars}}}", key)
    assert re.fullmatch(f"[0-9a-f]{{{task.value_chars}}}", value)
    examples.append((key, value))
    start = offset + len(key) + 1
    scored[start:start + len(value) + 1] = 1  # the value and its newline
    segment[start:start + len(value) + 1] = j + 1
    offset += len(line) + 1
  np.testing.assert_array_equal(batch["weights"][row], scored[1:])
  np.testing.assert_array_equal(batch["segments"][row], segment[1:])
  return examples


def naive_digits(rng, n):
  out = []
  for _ in range(n):
    d = [int(x) for x in rng.integers(0, 16, 32)]
    d[12], d[16] = 4, 8 + d[16] % 4
    out.append("".join("0123456789abcdef"[x] for x in d))
  return out


def test_pairs_are_fixed_distinct_hex_and_match_a_naive_redraw():
  task = UUIDPairsTask(n_pairs=50, key_chars=32, value_chars=32, pair_seed=3)
  rng = np.random.default_rng([3, 3])
  keys, values = naive_digits(rng, 50), naive_digits(rng, 50)
  assert task.pairs == list(zip(keys, values, strict=True))  # 128-bit keys never collide
  assert all(k[12] == "4" and k[16] in "89ab" for k in keys)
  assert UUIDPairsTask(n_pairs=50, key_chars=32, value_chars=32, pair_seed=3).pairs == task.pairs
  assert UUIDPairsTask(n_pairs=50, key_chars=32, value_chars=32, pair_seed=4).pairs != task.pairs
  short = UUIDPairsTask(n_pairs=50, key_chars=5, value_chars=7, pair_seed=3)
  assert short.pairs == [(k[:5], v[:7]) for k, v in task.pairs]


@pytest.mark.parametrize("key_chars, n_pairs", [(1, 16), (2, 200)])
def test_keys_are_distinct_after_redraws(key_chars, n_pairs):
  task = UUIDPairsTask(n_pairs=n_pairs, key_chars=key_chars)
  keys = [k for k, _ in task.pairs]
  assert len(set(keys)) == n_pairs and all(len(k) == key_chars for k in keys)
  if key_chars == 1:
    assert sorted(keys) == list("0123456789abcdef")
  # Keys, then values, then in index order each key equal to an earlier one is redrawn.
  rng = np.random.default_rng([0, 3])
  first, values = naive_digits(rng, n_pairs), naive_digits(rng, n_pairs)
  expected = []
  for d in first:
    key = d[:key_chars]
    while key in expected:
      key = naive_digits(rng, 1)[0][:key_chars]
    expected.append(key)
  assert task.pairs == [(k, v[:8]) for k, v in zip(expected, values, strict=True)]
  assert sum(k == d[:key_chars] for k, d in zip(keys, first, strict=True)) < n_pairs  # redrawn
  assert task.pairs == UUIDPairsTask(n_pairs=n_pairs, key_chars=key_chars).pairs


def test_training_rows_decode_to_pairs_drawn_from_the_row_stream():
  pairs = TASK.pairs
  index = {k: i for i, (k, _) in enumerate(pairs)}
  batch = TASK.train_batch(5, 11, BATCH, SEQ)
  assert set(batch) == {"inputs", "targets", "weights", "segments"}
  chex.assert_shape(list(batch.values()), (BATCH, SEQ))
  chex.assert_type(list(batch.values()), [np.int32, np.int32, np.float32, np.int32])
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  for row in range(BATCH):
    examples = decode(TASK, batch, row)
    assert len(examples) == (SEQ + 1) // 13 == TASK.per_row(SEQ)
    ids = [index[k] for k, _ in examples]
    assert all(pairs[i][1] == v for i, (_, v) in zip(ids, examples, strict=True))
    expected = np.random.default_rng([5, 11, 3, 0, row]).integers(0, 40, len(ids))
    assert ids == expected.tolist()


def test_train_batch_is_a_pure_function_of_seed_and_step():
  a = TASK.train_batch(3, 17, BATCH, SEQ)
  TASK.train_batch(3, 5, BATCH, SEQ)
  chex.assert_trees_all_equal(a, UUIDPairsTask(n_pairs=40, key_chars=6, value_chars=5)
                              .train_batch(3, 17, BATCH, SEQ))
  assert len({TASK.train_batch(0, s, BATCH, SEQ)["inputs"].tobytes() for s in range(5)}) == 5
  assert not np.array_equal(TASK.train_batch(0, 4, BATCH, SEQ)["inputs"],
                            TASK.train_batch(1, 4, BATCH, SEQ)["inputs"])
  # Uniform with replacement: 400 draws from 40 pairs reach every pair.
  seen = {ex for s in range(20) for r in range(BATCH)
          for ex in decode(TASK, TASK.train_batch(0, s, BATCH, SEQ), r)}
  assert seen == set(TASK.pairs)


def test_eval_batches_hold_every_pair_once_in_order():
  # 40 pairs, 5 a row: 8 rows, so 2 batches of 4 rows, or 3 of 3 rows (the last row padding).
  assert TASK.eval_batches_needed(SEQ, 4) == 2 and TASK.eval_batches_needed(SEQ, 3) == 3
  for batch_size in (3, 4):
    batches = TASK.eval_batches(SEQ, batch_size, 10)  # more than needed: cut to the needed ones
    assert len(batches) == TASK.eval_batches_needed(SEQ, batch_size)
    examples = []
    for batch in batches:
      for row in range(batch_size):
        examples += decode(TASK, batch, row) if batch["weights"][row].any() else []
    assert examples == TASK.pairs
  last = TASK.eval_batches(SEQ, 3, 3)[-1]
  assert last["weights"][2].sum() == 0 and (last["inputs"][2] == 0).all()
  assert last["segments"][2].sum() == 0 and last["weights"][1].sum() == 5 * 6
  # Too few batches evaluate the first pairs.
  first = TASK.eval_batches(SEQ, 3, 1)
  assert len(first) == 1 and sum((decode(TASK, first[0], r) for r in range(3)), []) == (
      TASK.pairs[:15])
  # A last row holding fewer examples than fit: pairs 0..6 at 5 a row.
  tail = UUIDPairsTask(n_pairs=7, key_chars=6, value_chars=5).eval_batches(SEQ, 2, 1)[0]
  assert [len(decode(TASK, tail, r)) for r in range(2)] == [5, 2]
  assert tail["segments"][1].max() == 2


def test_process_slices_concatenate_to_the_global_batch():
  full = TASK.train_batch(2, 9, BATCH, SEQ)
  evals = TASK.eval_batches(SEQ, BATCH, 2)
  for count in (2, 3):
    parts = [TASK.train_batch(2, 9, BATCH, SEQ, i, count) for i in range(count)]
    eval_parts = [TASK.eval_batches(SEQ, BATCH, 2, i, count) for i in range(count)]
    chex.assert_trees_all_equal({k: np.concatenate([p[k] for p in parts]) for k in full}, full)
    for j in range(2):
      chex.assert_trees_all_equal(
          {k: np.concatenate([p[j][k] for p in eval_parts]) for k in evals[j]}, evals[j])


def test_registration_data_config_and_bad_options():
  assert TASKS["uuid"] is UUIDPairsTask and UUIDPairsTask.task_id == 3
  assert make_task("uuid", max_ops=5, eval_ops=None, n_pairs=7) == UUIDPairsTask(n_pairs=7)
  assert make_task("polynomial", n_pairs=512) == make_task("polynomial")
  with pytest.raises(ConfigError, match="n_pairs=7 does not apply to the polynomial task"):
    make_task("polynomial", n_pairs=7)
  with pytest.raises(ConfigError, match="max_ops=3 does not apply to the uuid task"):
    make_task("uuid", max_ops=3)
  DataConfig(task="uuid").validate()
  assert make_source(DataConfig(task="uuid", task_pairs=9), SEQ) == UUIDPairsTask(n_pairs=9)
  with pytest.raises(ConfigError, match="data.task_pairs must be >= 1"):
    DataConfig(task="uuid", task_pairs=0).validate()
  for options, message in [(dict(n_pairs=0), "n_pairs must be >= 1"),
                           (dict(key_chars=0), "key_chars and value_chars must be in 1..32"),
                           (dict(key_chars=33), "key_chars and value_chars must be in 1..32"),
                           (dict(value_chars=0), "key_chars and value_chars must be in 1..32"),
                           (dict(key_chars=1, n_pairs=17), "n_pairs=17 exceeds the 16 distinct")]:
    with pytest.raises(ConfigError, match=message):
      UUIDPairsTask(**options)
  assert UUIDPairsTask(key_chars=1, n_pairs=16).n_pairs == 16
  assert TASK.min_seq_len() == 12
  assert len(TASK.train_batch(0, 0, 2, 12)["inputs"][0]) == 12
  with pytest.raises(ConfigError, match="seq_len=11 is too short .* must be >= 12"):
    TASK.train_batch(0, 0, 2, 11)
  with pytest.raises(ConfigError, match="must be >= 12"):
    TASK.eval_batches(11, 2, 1)

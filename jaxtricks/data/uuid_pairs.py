"""The memorisation task of MoRA (Jiang et al. 2024, arXiv 2405.12130): a fixed set
of random UUID key -> value pairs, learned by fine-tuning; the metric is exact match of the value
given the key (jaxtricks.train.exact_match, `--train.loss=lm_exact`). Byte-level (vocabulary 256,
ASCII text), as the tasks of jaxtricks.data.synthetic.

The pairs: `n_pairs` keys and values, each the first `key_chars` (`value_chars`) lowercase hex
digits of a uuid-4 style draw of 32 hex digits from np.random.default_rng([pair_seed, 3]) (all
random but digit 13, always '4', and digit 17, one of '89ab', as in RFC 4122's version 4): first
the n_pairs keys, then the values; keys are then made distinct in index order, a key equal to an
earlier one being redrawn from the same generator until it differs. Python's uuid module is not
used (it is not seeded). An example is the text

    "1f3a9c0e:7b2d44e1\\n"

and only the value and its newline are scored: weights are 1 on the TARGET positions of those
bytes. All examples have L = key_chars + value_chars + 2 bytes, so a (T+1)-byte window holds
K = (T+1) // L of them (T >= L - 1), packed from offset 0 and padded with NUL bytes (weight 0).

Batches are {'inputs', 'targets', 'segments': (B, T) int32, 'weights': (B, T) float32}; segments
is, at each TARGET position, the 1-based index within its row of the example whose value it scores
and 0 where nothing is scored, so exact match per example can be computed.

Training row r of step s holds K pair indices drawn uniformly with replacement from
np.random.default_rng([seed, s, 3, 0, r]), as every task of jaxtricks.data.synthetic draws its rows.
Held-out batches are the memorised set itself: together they hold every pair exactly once, in index
order (global row g = i * batch_size + r of batch i holds pairs g*K .. g*K + K - 1), and rows past
the last pair are padding (weight 0). `eval_batches_needed(T, B)` batches hold them all; fewer
evaluate only the first n_batches * B * K pairs, and more are cut to that many (an all-padding
batch would have no scored token).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np
from absl import logging

from jaxtricks.data.synthetic import TASKS, _Task
from jaxtricks.errors import ConfigError

UUID_DIGITS = 32
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_COLON, _NEWLINE = ord(":"), ord("\n")


def uuid4_digits(rng: np.random.Generator, n: int) -> np.ndarray:
  """(n, 32) int64 hex digit values of uuid-4 style draws: version digit 4, variant 8..b."""
  d_NxU = rng.integers(0, 16, (n, UUID_DIGITS))
  d_NxU[:, 12] = 4
  d_NxU[:, 16] = 8 + d_NxU[:, 16] % 4
  return d_NxU


def distinct_prefixes(chars: int) -> int:
  """How many different first `chars` digits uuid4_digits can give (16**chars for chars <= 12)."""
  choices = [1 if i == 12 else 4 if i == 16 else 16 for i in range(chars)]
  return int(np.prod(choices, dtype=object))


@dataclasses.dataclass(frozen=True)
class UUIDPairsTask(_Task):
  n_pairs: int = 512    # the fixed set of key -> value pairs to memorise
  key_chars: int = 8    # hex digits per key
  value_chars: int = 8  # hex digits per value
  pair_seed: int = 0    # which set of pairs (independent of the training seed)
  task_id: ClassVar[int] = 3
  name: ClassVar[str] = "uuid"

  def __post_init__(self):
    if self.n_pairs < 1:
      raise ConfigError(f"uuid: n_pairs must be >= 1, got {self.n_pairs}")
    if not 1 <= self.key_chars <= UUID_DIGITS or not 1 <= self.value_chars <= UUID_DIGITS:
      raise ConfigError(f"uuid: key_chars and value_chars must be in 1..{UUID_DIGITS}, got "
                        f"{self.key_chars} and {self.value_chars}")
    if self.n_pairs > distinct_prefixes(self.key_chars):
      raise ConfigError(f"uuid: n_pairs={self.n_pairs} exceeds the "
                        f"{distinct_prefixes(self.key_chars)} distinct keys of "
                        f"key_chars={self.key_chars}")

  @property
  def example_len(self) -> int:
    """L: bytes of one example, 'key:value\\n'."""
    return self.key_chars + self.value_chars + 2

  def min_seq_len(self) -> int:
    return self.example_len - 1

  def per_row(self, seq_len: int) -> int:
    """K: the examples in one row of seq_len targets."""
    if seq_len < self.min_seq_len():
      raise ConfigError(f"seq_len={seq_len} is too short for the {self.name} task with "
                        f"{self}: it must be >= {self.min_seq_len()}")
    return (seq_len + 1) // self.example_len

  def eval_batches_needed(self, seq_len: int, batch_size: int) -> int:
    """The number of held-out batches that hold every pair."""
    rows = -(-self.n_pairs // self.per_row(seq_len))
    return -(-rows // batch_size)

  @functools.cached_property
  def _examples_NxL(self) -> np.ndarray:
    rng = np.random.default_rng([self.pair_seed, self.task_id])
    keys_NxK = uuid4_digits(rng, self.n_pairs)[:, :self.key_chars]
    values_NxV = uuid4_digits(rng, self.n_pairs)[:, :self.value_chars]
    seen = set()
    for i in range(self.n_pairs):
      while keys_NxK[i].tobytes() in seen:
        keys_NxK[i] = uuid4_digits(rng, 1)[0, :self.key_chars]
      seen.add(keys_NxK[i].tobytes())
    column = lambda c: np.full((self.n_pairs, 1), c, np.uint8)
    return np.concatenate([_HEX[keys_NxK], column(_COLON), _HEX[values_NxV], column(_NEWLINE)],
                          axis=1)

  @property
  def pairs(self) -> list[tuple[str, str]]:
    """The (key, value) strings, in index order."""
    text = self._examples_NxL.tobytes().decode("ascii")
    return [tuple(line.split(":")) for line in text.splitlines()]

  def _pack(self, ids_BxK: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The batch whose row b holds examples ids_BxK[b] in order (-1: padding)."""
    b, k = ids_BxK.shape
    length = self.example_len
    valid_BxKx1 = (ids_BxK >= 0)[..., None]
    bytes_BxKxL = np.where(valid_BxKx1, self._examples_NxL[np.maximum(ids_BxK, 0)], 0)
    scores_L = np.arange(length) > self.key_chars  # the value's digits and its newline
    slot_BxKxL = np.where(valid_BxKx1 & scores_L, np.arange(1, k + 1)[None, :, None], 0)
    window_BxT1 = np.zeros((b, seq_len + 1), np.int32)
    segment_BxT1 = np.zeros((b, seq_len + 1), np.int32)
    window_BxT1[:, :k * length] = bytes_BxKxL.reshape(b, k * length)
    segment_BxT1[:, :k * length] = slot_BxKxL.reshape(b, k * length)
    segments_BxT = segment_BxT1[:, 1:]
    return {"inputs": window_BxT1[:, :-1], "targets": window_BxT1[:, 1:],
            "weights": (segments_BxT > 0).astype(np.float32), "segments": segments_BxT}

  def _batch(self, key: tuple[int, int, int], rows: np.ndarray, seq_len: int
             ) -> dict[str, np.ndarray]:
    """Training rows (_Task.train_batch's key): K pair indices per row, with replacement."""
    a, b, stream = key
    k = self.per_row(seq_len)
    ids_BxK = np.zeros((len(rows), k), np.int64)
    for i, r in enumerate(rows):
      rng = np.random.default_rng([a, b, self.task_id, stream, int(r)])
      ids_BxK[i] = rng.integers(0, self.n_pairs, k)
    return self._pack(ids_BxK, seq_len)

  def eval_batches(self, seq_len: int, batch_size: int, n_batches: int, process_index: int = 0,
                   process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """This process's rows of min(n_batches, eval_batches_needed) fixed batches that hold the
    pairs in index order, each once (only the first ones when n_batches is too few)."""
    k = self.per_row(seq_len)
    needed = self.eval_batches_needed(seq_len, batch_size)
    if n_batches < needed:
      logging.warning("uuid: %d held-out batches of %d rows evaluate %d of the %d pairs; %d "
                      "batches hold them all", n_batches, batch_size,
                      n_batches * batch_size * k, self.n_pairs, needed)
    rows = np.array_split(np.arange(batch_size), process_count)[process_index]
    out = []
    for i in range(min(n_batches, needed)):
      ids_BxK = (i * batch_size + rows)[:, None] * k + np.arange(k)
      out.append(self._pack(np.where(ids_BxK < self.n_pairs, ids_BxK, -1), seq_len))
    return out


TASKS["uuid"] = UUIDPairsTask

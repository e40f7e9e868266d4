"""Deterministic batches: the batch of step s is a function of (seed, s) alone.

A resumed run therefore sees exactly the batches it would have seen, and in a multi-process run
each process slices its rows out of the same global batch.
"""

from __future__ import annotations

import numpy as np


def window_batch(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """{'inputs', 'targets'} of shape (len(offsets), seq_len): targets are inputs shifted by one."""
  idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
  window = tokens[idx].astype(np.int32)
  return {"inputs": window[:, :-1], "targets": window[:, 1:]}


def train_offsets(n_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Uniform random window starts for step `step`, from a generator seeded by (seed, step)."""
  rng = np.random.default_rng([seed, step])
  return rng.integers(0, n_tokens - seq_len, size=batch_size, endpoint=False)


def train_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global batch of step `step`."""
  offsets = train_offsets(len(tokens), seq_len, batch_size, seed, step)
  rows = np.array_split(np.arange(batch_size), process_count)[process_index]
  return window_batch(tokens, offsets[rows], seq_len)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Fixed held-out batches: windows evenly spaced over the split, independent of the seed."""
  n = batch_size * n_batches
  offsets = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
  rows = np.array_split(np.arange(batch_size), process_count)[process_index]
  return [window_batch(tokens, offsets[i * batch_size:(i + 1) * batch_size][rows], seq_len)
          for i in range(n_batches)]

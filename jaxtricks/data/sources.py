"""Where batches come from: the byte corpus or a synthetic task, behind one interface.

A source gives `train_batch(seed, step, batch_size, seq_len, process_index, process_count)`, a
pure function of (seed, step), and `eval_batches(seq_len, batch_size, n_batches, process_index,
process_count)`, fixed held-out batches; both return this process's rows as numpy dicts with
'inputs', 'targets' and, for tasks, 'weights' (1 where a target is scored; the uuid task also
gives 'segments', jaxtricks.data.uuid_pairs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxtricks.data import batching
from jaxtricks.data.corpus import Corpus, DataConfig, load_corpus


@dataclasses.dataclass(frozen=True)
class CorpusSource:
  corpus: Corpus

  def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int,
                  process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    return batching.train_batch(self.corpus.train, seq_len, batch_size, seed, step,
                                process_index, process_count)

  def eval_batches(self, seq_len: int, batch_size: int, n_batches: int, process_index: int = 0,
                   process_count: int = 1) -> list[dict[str, np.ndarray]]:
    return batching.eval_batches(self.corpus.val, seq_len, batch_size, n_batches, process_index,
                                 process_count)


def make_source(cfg: DataConfig, seq_len: int):
  """The configured source; a corpus source also exposes `.corpus` (for decoding prompts)."""
  if not cfg.task:
    return CorpusSource(load_corpus(cfg, min_len=seq_len + 1))
  from jaxtricks.data.synthetic import make_task  # noqa: PLC0415 (only tasks need it)

  return make_task(cfg.task, max_ops=cfg.task_ops, eval_ops=cfg.task_eval_ops or None,
                   n_pairs=cfg.task_pairs)


def held_out_prompts(source, n: int, length: int) -> list[np.ndarray]:
  """n held-out token sequences of `length` (decoding prompts), the same on every call."""
  corpus = getattr(source, "corpus", None)
  if corpus is None:
    return list(source.eval_batches(length, n, 1)[0]["inputs"])
  starts = np.linspace(0, len(corpus.val) - length - 1, n).astype(int)
  return [corpus.val[s:s + length] for s in starts]

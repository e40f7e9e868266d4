"""The two synthetic tasks of multi-token prediction (Gloeckle et al. 2024, arXiv 2404.19737),
scaled down, as deterministic byte-level batches (vocabulary 256, ASCII text).

A batch is {'inputs', 'targets': (B, T) int32, 'weights': (B, T) float32}, cut from a (B, T+1)
window (targets are inputs shifted by one); weights are 1 exactly where the TARGET is scored.
Row r of the batch of step s is drawn from np.random.default_rng([seed, s, task id, 0, r]), so a
batch is a pure function of (seed, step) and each process builds only its rows; held-out batch i
uses [0, i, task id, 1, r], a stream no seed can reach.

Induction ('induction'): a story of random lowercase filler words separated by spaces, in which
`n_names` names appear. A name is two uppercase letters, drawn per row (distinct first letters, so
26*26 names and nothing to memorise); it is introduced once and may be repeated later. Only the
second letter of a repeated mention is scored: predicting it from the first letter needs the
earlier mention (an induction head). A row is one story cut to T+1 bytes, e.g. ('^' = scored):

    "YK yfoig he oosbs ekuucef o YK ywxgsjb oruf YK x"
                                  ^               ^

Polynomials ('polynomial'): arithmetic in F7[X]/(X^5). An expression has m operations (+, -, *)
on m+1 random polynomials, each in parentheses with 1..`max_terms` nonzero terms; * binds tighter
than + and -, which associate to the left. An example is the expression, '=', the answer and a
newline; only the answer and the newline are scored:

    "(3x^2+1)*(x+4)-(2x)=3x^3+5x^2+6x+4\\n"

Canonical form of a polynomial: nonzero terms by descending degree joined by '+', a term is
'c', 'cx' or 'cx^k' with c in 1..6 and the coefficient omitted when it is 1 (but not for the
constant term), the zero polynomial is '0'. A row packs as many whole examples as fit in T+1
bytes and is padded with NUL bytes (weight 0). Training draws m uniformly in min_ops..max_ops per
example; held-out batches use exactly `eval_ops` operations (out of distribution when larger than
max_ops), or the training range when it is None.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import numpy as np

from jaxtricks.errors import ConfigError

TRAIN_STREAM, EVAL_STREAM = 0, 1
P, DEGREE = 7, 5  # the field F7, and X^5 = 0
_UPPER, _LOWER = 65, 97


class _Task:
  """train_batch / eval_batches over a per-row generator `_row(rng, seq_len, held_out)`."""

  task_id: ClassVar[int]
  name: ClassVar[str]

  def min_seq_len(self) -> int:
    raise NotImplementedError

  def _row(self, rng: np.random.Generator, seq_len: int, held_out: bool) -> tuple[bytes, list]:
    """At most seq_len+1 bytes of text and the byte offsets whose token is scored."""
    raise NotImplementedError

  def _batch(self, key: tuple[int, int, int], rows: np.ndarray, seq_len: int
             ) -> dict[str, np.ndarray]:
    if seq_len < self.min_seq_len():
      raise ConfigError(f"seq_len={seq_len} is too short for the {self.name} task with "
                        f"{self}: it must be >= {self.min_seq_len()}")
    a, b, stream = key
    window_BxT1 = np.zeros((len(rows), seq_len + 1), np.uint8)
    scored_BxT1 = np.zeros((len(rows), seq_len + 1), np.float32)
    for i, r in enumerate(rows):
      rng = np.random.default_rng([a, b, self.task_id, stream, int(r)])
      text, scored = self._row(rng, seq_len, held_out=stream == EVAL_STREAM)
      window_BxT1[i, :len(text)] = np.frombuffer(text, np.uint8)
      scored_BxT1[i, scored] = 1.0
    window_BxT1 = window_BxT1.astype(np.int32)
    return {"inputs": window_BxT1[:, :-1], "targets": window_BxT1[:, 1:],
            "weights": scored_BxT1[:, 1:]}

  def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int,
                  process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of step `step`; a pure function of (seed, step)."""
    rows = np.array_split(np.arange(batch_size), process_count)[process_index]
    return self._batch((seed, step, TRAIN_STREAM), rows, seq_len)

  def eval_batches(self, seq_len: int, batch_size: int, n_batches: int, process_index: int = 0,
                   process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches, the same for every seed."""
    rows = np.array_split(np.arange(batch_size), process_count)[process_index]
    return [self._batch((0, i, EVAL_STREAM), rows, seq_len) for i in range(n_batches)]


@dataclasses.dataclass(frozen=True)
class InductionTask(_Task):
  n_names: int = 3            # names per story
  mention_prob: float = 0.25  # probability that a word is a name mention rather than filler
  task_id: ClassVar[int] = 1
  name: ClassVar[str] = "induction"

  def __post_init__(self):
    if not 1 <= self.n_names <= 26 or not 0.0 < self.mention_prob <= 1.0:
      raise ConfigError(f"induction: n_names must be in 1..26 and mention_prob in (0, 1], got "
                        f"{self.n_names} and {self.mention_prob}")

  def min_seq_len(self) -> int:
    return 16

  def _row(self, rng, seq_len, held_out):
    del held_out
    while True:  # redraw the (rare) stories without a scored position
      first = rng.choice(26, self.n_names, replace=False) + _UPPER
      second = rng.integers(0, 26, self.n_names) + _UPPER
      names = [bytes([f, s]) for f, s in zip(first, second, strict=True)]
      words, scored, introduced, length = [], [], 0, 0
      while length < seq_len + 2:  # the joined text is length - 1 bytes
        if rng.random() < self.mention_prob:
          if introduced < self.n_names and (introduced == 0 or rng.random() < 0.5):
            word, introduced = names[introduced], introduced + 1
          else:
            word = names[rng.integers(introduced)]
            scored.append(length + 1)
        else:
          word = bytes(rng.integers(_LOWER, _LOWER + 26, rng.integers(1, 8)).astype(np.uint8))
        words.append(word)
        length += len(word) + 1
      scored = [j for j in scored if j <= seq_len]
      if scored:
        return b" ".join(words)[:seq_len + 1], scored


def format_poly(c: np.ndarray) -> str:
  """Canonical text of coefficients c[0..4] (c[k] multiplies x^k), e.g. '3x^4+x^2+6'."""
  terms = []
  for k in range(DEGREE - 1, -1, -1):
    ck = int(c[k]) % P
    if ck:
      coef = "" if ck == 1 and k else str(ck)
      terms.append(coef + ("" if k == 0 else "x" if k == 1 else f"x^{k}"))
  return "+".join(terms) or "0"


_TERM = re.compile(r"(\d*)(?:(x)(?:\^(\d+))?)?")
_EXPR = re.compile(r"\([^()]*\)(?:[-+*]\([^()]*\))*")


def parse_poly(text: str) -> np.ndarray:
  """Coefficients (5,) int64 of a sum of terms 'c', 'cx', 'cx^k' (c optional); reduced."""
  c = np.zeros(DEGREE, np.int64)
  for term in text.split("+"):
    m = _TERM.fullmatch(term)
    if not term or m is None or not (m.group(1) or m.group(2)):
      raise ValueError(f"not a polynomial term: {term!r} in {text!r}")
    k = int(m.group(3)) if m.group(3) else 1 if m.group(2) else 0
    if k < DEGREE:
      c[k] += int(m.group(1)) if m.group(1) else 1
  return c % P


def poly_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Product in F7[X]/(X^5): powers >= 5 dropped, coefficients mod 7."""
  return np.convolve(a, b)[:DEGREE] % P


def evaluate(expr: str) -> np.ndarray:
  """Value of '(p)op(q)op...' with * before + and -, left to right; coefficients (5,) int64."""
  if _EXPR.fullmatch(expr) is None:
    raise ValueError(f"not an expression of parenthesised polynomials: {expr!r}")
  operands = [parse_poly(s) for s in re.findall(r"\(([^()]*)\)", expr)]
  ops = re.findall(r"\)([-+*])\(", expr)
  products, signs = [operands[0]], [1]
  for op, q in zip(ops, operands[1:], strict=True):
    if op == "*":
      products[-1] = poly_mul(products[-1], q)
    else:
      products.append(q)
      signs.append(1 if op == "+" else -1)
  return sum(s * p for s, p in zip(signs, products, strict=True)) % P


@dataclasses.dataclass(frozen=True)
class PolynomialTask(_Task):
  min_ops: int = 1               # training expressions have min_ops..max_ops operations
  max_ops: int = 5
  eval_ops: int | None = None    # held-out expressions: exactly this many (None: as training)
  max_terms: int = 2             # nonzero terms per operand: 1..max_terms
  task_id: ClassVar[int] = 2
  name: ClassVar[str] = "polynomial"

  def __post_init__(self):
    if not 1 <= self.min_ops <= self.max_ops or (self.eval_ops is not None
                                                 and self.eval_ops < 1):
      raise ConfigError(f"polynomial: need 1 <= min_ops <= max_ops and eval_ops >= 1 (or None), "
                        f"got min_ops={self.min_ops} max_ops={self.max_ops} "
                        f"eval_ops={self.eval_ops}")
    if not 1 <= self.max_terms <= DEGREE:
      raise ConfigError(f"polynomial: max_terms must be in 1..{DEGREE}, got {self.max_terms}")

  def max_example_len(self, n_ops: int) -> int:
    """Bytes of the longest example with n_ops operations."""
    term_lens = sorted((len(format_poly(np.eye(DEGREE, dtype=int)[k] * 6)) for k in range(DEGREE)),
                       reverse=True)
    operand = sum(term_lens[:self.max_terms]) + self.max_terms - 1 + 2  # '+'s and parentheses
    answer = sum(term_lens) + DEGREE - 1
    return (n_ops + 1) * operand + n_ops + 1 + answer + 1  # operators, '=', answer, '\n'

  def min_seq_len(self) -> int:
    return self.max_example_len(max(self.max_ops, self.eval_ops or 0)) - 1

  def example(self, rng: np.random.Generator, n_ops: int) -> tuple[str, str]:
    """A random expression with n_ops operations and its canonical answer."""
    operands = []
    for _ in range(n_ops + 1):
      c = np.zeros(DEGREE, np.int64)
      n_terms = rng.integers(1, self.max_terms + 1)
      c[rng.choice(DEGREE, n_terms, replace=False)] = rng.integers(1, P, n_terms)
      operands.append(f"({format_poly(c)})")
    ops = ["+-*"[i] for i in rng.integers(0, 3, n_ops)]
    expr = operands[0] + "".join(o + q for o, q in zip(ops, operands[1:], strict=True))
    return expr, format_poly(evaluate(expr))

  def _row(self, rng, seq_len, held_out):
    lo, hi = ((self.eval_ops, self.eval_ops) if held_out and self.eval_ops
              else (self.min_ops, self.max_ops))
    text, scored = "", []
    while True:
      expr, answer = self.example(rng, int(rng.integers(lo, hi + 1)))
      if len(text) + len(expr) + len(answer) + 2 > seq_len + 1:
        return text.encode("ascii"), scored
      start = len(text) + len(expr) + 1
      scored += range(start, start + len(answer) + 1)
      text += f"{expr}={answer}\n"


TASKS: dict[str, type[_Task]] = {"induction": InductionTask, "polynomial": PolynomialTask}
import jaxtricks.data.uuid_pairs  # noqa: E402, F401  (it subclasses _Task; adds TASKS["uuid"])


def make_task(name: str, **options: Any) -> InductionTask | PolynomialTask:
  """The task `name` with its dataclass fields as options. An option of another task is ignored
  when it holds that task's default (so one data config can name either task), else rejected."""
  if name not in TASKS:
    raise ConfigError(f"unknown synthetic task {name!r}; valid: {', '.join(TASKS)}")
  own = {f.name for f in dataclasses.fields(TASKS[name])}
  kept = {}
  for key, value in options.items():
    if key in own:
      kept[key] = value
      continue
    defaults = [f.default for cls in TASKS.values() for f in dataclasses.fields(cls)
                if f.name == key]
    if not defaults or value != defaults[0]:
      raise ConfigError(f"option {key}={value!r} does not apply to the {name} task; its options: "
                        f"{', '.join(sorted(own))}")
  return TASKS[name](**kept)

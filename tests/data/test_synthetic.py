"""Synthetic tasks: exact F7[X]/(X^5) arithmetic against an independent reference, scored
positions found again by decoding the text, determinism in (seed, step), process slicing."""

import re

import chex
import numpy as np
import pytest

from jaxtricks.data.synthetic import (
  InductionTask,
  PolynomialTask,
  evaluate,
  format_poly,
  make_task,
  parse_poly,
  poly_mul,
)

SEQ, BATCH = 128, 8
TASK_LIST = [InductionTask(), PolynomialTask()]


class RefPoly:
  """Unreduced integer polynomials (plain lists); the reduction happens once, at the end."""

  def __init__(self, c):
    self.c = list(c)

  @staticmethod
  def lift(v):
    return v if isinstance(v, RefPoly) else RefPoly([v])

  def __add__(self, other):
    a, b = self.c, self.lift(other).c
    n = max(len(a), len(b))
    return RefPoly([(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)])

  def __neg__(self):
    return RefPoly([-x for x in self.c])

  def __sub__(self, other):
    return self + -self.lift(other)

  def __mul__(self, other):
    b = self.lift(other).c
    out = [0] * (len(self.c) + len(b) - 1)
    for i, x in enumerate(self.c):
      for j, y in enumerate(b):
        out[i + j] += x * y
    return RefPoly(out)

  def __pow__(self, k):
    out = RefPoly([1])
    for _ in range(k):
      out = out * self
    return out

  __radd__, __rmul__ = __add__, __mul__

  def __rsub__(self, other):
    return self.lift(other) - self


def reference(expr):
  """Python's own precedence over exact integer polynomials, then mod X^5 and mod 7."""
  py = re.sub(r"(\d)x", r"\1*x", expr).replace("^", "**")
  value = RefPoly.lift(eval(py, {"__builtins__": {}, "x": RefPoly([0, 1])}))
  c = (value.c + [0] * 5)[:5]
  return [x % 7 for x in c]


def text_of(batch, row):
  window = list(batch["inputs"][row]) + [int(batch["targets"][row, -1])]
  return bytes(window).decode("ascii")


def scored_offsets(batch, row):
  """Offsets in the (T+1)-byte window whose byte is a scored target."""
  return set((np.flatnonzero(batch["weights"][row]) + 1).tolist())


@pytest.mark.parametrize("expr, answer", [
  ("(x^4+x)*(x^2)", "x^3"),
  ("(6x+6)+(1x+1)", "0"),
  ("(3x^2+1)*(x+4)-(2x)", "3x^3+5x^2+6x+4"),
  ("(x)+(2)*(3)", "x+6"),              # * before +
  ("(2)-(3)-(4)", "2"),                # left to right: -5 = 2 mod 7
  ("(x^2)*(x^2)*(x)", "0"),            # x^5 = 0
  ("(4x^3+5)*(3x^3+2x+6)", "x^4+4x^3+3x+2"),  # 8x^4+39x^3+10x+30
])
def test_hand_checked_expressions(expr, answer):
  assert format_poly(evaluate(expr)) == answer
  assert format_poly(reference(expr)) == answer


def test_canonical_format_round_trips():
  np.testing.assert_array_equal(parse_poly("3x^4+x^2+6"), [6, 0, 1, 0, 3])
  assert format_poly(np.array([6, 0, 1, 0, 3])) == "3x^4+x^2+6"
  assert format_poly(np.array([1, 1, 0, 0, 0])) == "x+1"
  assert format_poly(np.zeros(5, int)) == "0"
  rng = np.random.default_rng(0)
  for c in rng.integers(0, 7, (200, 5)):
    np.testing.assert_array_equal(parse_poly(format_poly(c)), c)
  for bad in ("", "3y", "x^", "3+", "(3)"):
    with pytest.raises(ValueError, match="not a polynomial term"):
      parse_poly(bad)
  with pytest.raises(ValueError, match="not an expression"):
    evaluate("(x)+x")


def test_poly_mul_truncates_and_reduces():
  rng = np.random.default_rng(1)
  for _ in range(100):
    a, b = rng.integers(0, 7, (2, 5))
    full = np.zeros(9, int)
    for i in range(5):
      for j in range(5):
        full[i + j] += a[i] * b[j]
    np.testing.assert_array_equal(poly_mul(a, b), full[:5] % 7)


def test_polynomial_answers_match_the_reference_and_only_answers_are_scored():
  task = PolynomialTask(max_ops=5, eval_ops=8)
  batches = [task.train_batch(0, s, BATCH, SEQ) for s in range(3)]
  batches += task.eval_batches(SEQ, BATCH, 2)
  n_ops = {True: set(), False: set()}
  for k, batch in enumerate(batches):
    for row in range(BATCH):
      text = text_of(batch, row)
      body = text.rstrip("\0")
      assert body.endswith("\n") and "\0" not in body and len(text) == SEQ + 1
      expected, offset = set(), 0
      for line in body[:-1].split("\n"):
        expr, answer = line.split("=")
        assert answer == format_poly(reference(expr)) == format_poly(evaluate(expr))
        n_ops[k >= 3].add(len(re.findall(r"\)[-+*]\(", expr)))
        start = offset + len(expr) + 1
        expected |= set(range(start, start + len(answer) + 1))  # the answer and its newline
        offset += len(line) + 1
      assert scored_offsets(batch, row) == expected
  assert n_ops[False] == {1, 2, 3, 4, 5} and n_ops[True] == {8}


def test_induction_weights_sit_on_second_letters_of_repeated_names():
  task = InductionTask()
  batch = task.train_batch(3, 7, BATCH, SEQ)
  names = set()
  for row in range(BATCH):
    text = text_of(batch, row)
    assert re.fullmatch(r"[a-zA-Z ]+", text) and len(text) == SEQ + 1
    seen, expected = {}, set()
    for m in re.finditer(r"\b[A-Z]{2}(?=\s|$)", text):
      first, second = m.group()
      assert seen.setdefault(first, second) == second  # one name per first letter
      if m.group() in names_in(text[:m.start()]):
        expected.add(m.start() + 1)
      names.add(m.group())
    assert expected and scored_offsets(batch, row) == expected
  assert len(names) > 10  # drawn per row, not from a small fixed list


def names_in(prefix):
  return set(re.findall(r"\b[A-Z]{2}\b", prefix))


@pytest.mark.parametrize("task", TASK_LIST, ids=lambda t: t.name)
def test_shapes_dtypes_and_shifted_targets(task):
  for batch in [task.train_batch(0, 0, BATCH, SEQ), *task.eval_batches(SEQ, BATCH, 2)]:
    assert set(batch) == {"inputs", "targets", "weights"}
    chex.assert_shape([batch["inputs"], batch["targets"], batch["weights"]], (BATCH, SEQ))
    chex.assert_type([batch["inputs"], batch["targets"], batch["weights"]],
                     [np.int32, np.int32, np.float32])
    assert set(np.unique(batch["weights"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < 128


@pytest.mark.parametrize("task", TASK_LIST, ids=lambda t: t.name)
def test_train_batch_is_a_pure_function_of_seed_and_step(task):
  a = task.train_batch(3, 17, BATCH, SEQ)
  task.train_batch(3, 5, BATCH, SEQ)  # no hidden state between calls
  b = make_task(task.name).train_batch(3, 17, BATCH, SEQ)
  chex.assert_trees_all_equal(a, b)
  inputs = {task.train_batch(0, s, BATCH, SEQ)["inputs"].tobytes() for s in range(5)}
  assert len(inputs) == 5
  assert not np.array_equal(task.train_batch(0, 4, BATCH, SEQ)["inputs"],
                            task.train_batch(1, 4, BATCH, SEQ)["inputs"])


@pytest.mark.parametrize("task", TASK_LIST, ids=lambda t: t.name)
def test_process_slices_concatenate_to_the_global_batch(task):
  full = task.train_batch(2, 9, BATCH, SEQ)
  evals = task.eval_batches(SEQ, BATCH, 2)
  for count in (2, 3):
    parts = [task.train_batch(2, 9, BATCH, SEQ, i, count) for i in range(count)]
    eval_parts = [task.eval_batches(SEQ, BATCH, 2, i, count) for i in range(count)]
    chex.assert_trees_all_equal({k: np.concatenate([p[k] for p in parts]) for k in full}, full)
    for j in range(2):
      chex.assert_trees_all_equal(
          {k: np.concatenate([p[j][k] for p in eval_parts]) for k in evals[j]}, evals[j])


@pytest.mark.parametrize("task", TASK_LIST, ids=lambda t: t.name)
def test_eval_batches_are_fixed_and_apart_from_training(task):
  a, b = task.eval_batches(SEQ, BATCH, 3), task.eval_batches(SEQ, BATCH, 3)
  chex.assert_trees_all_equal([x["inputs"] for x in a], [y["inputs"] for y in b])
  assert len({x["inputs"].tobytes() for x in a}) == 3
  train_rows = {row.tobytes() for seed in range(3) for step in range(3)
                for row in task.train_batch(seed, step, BATCH, SEQ)["inputs"]}
  assert not train_rows & {row.tobytes() for x in a for row in x["inputs"]}


def test_bad_names_options_and_lengths_raise_one_line_value_errors():
  with pytest.raises(ValueError, match="unknown synthetic task 'nope'; valid: induction, "
                                       "polynomial"):
    make_task("nope")
  with pytest.raises(ValueError, match="min_ops <= max_ops"):
    make_task("polynomial", max_ops=0)
  with pytest.raises(ValueError, match="eval_ops >= 1"):
    make_task("polynomial", eval_ops=0)
  with pytest.raises(ValueError, match="n_names must be in 1..26"):
    make_task("induction", n_names=27)
  with pytest.raises(ValueError, match="foo=1 does not apply to the induction task; its "
                                       "options: mention_prob, n_names"):
    make_task("induction", foo=1)
  with pytest.raises(ValueError, match="max_ops=3 does not apply to the induction task"):
    make_task("induction", max_ops=3)
  # What jaxtricks.data.sources passes for either task with the default data config.
  assert make_task("induction", max_ops=5, eval_ops=None) == InductionTask()
  assert make_task("polynomial", max_ops=4, eval_ops=7) == PolynomialTask(max_ops=4, eval_ops=7)
  task = PolynomialTask(max_ops=5)
  assert task.min_seq_len() == 91
  task.train_batch(0, 0, 2, 91)
  with pytest.raises(ValueError, match="seq_len=90 is too short .* must be >= 91"):
    task.train_batch(0, 0, 2, 90)
  with pytest.raises(ValueError, match="must be >= 151"):
    PolynomialTask(eval_ops=10).eval_batches(128, 2, 1)
  with pytest.raises(ValueError, match="must be >= 16"):
    InductionTask().eval_batches(8, 2, 1)

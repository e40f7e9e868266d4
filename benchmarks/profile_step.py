"""Where the train step's time goes: a jax.profiler trace of the real step, summed by source op.

    python -m benchmarks.profile_step [--config=d512] [--set=model.attention.impl=xla,...]
                                      [--steps=5] [--top=5] [--out=...json]

Runs the jitted, sharded step of `benchmarks.common.configs` (what the loop runs), traces
`--steps` steps after warm-up, and sums the device time of every executed HLO instruction. Each
instruction is named by the op it came from (its `op_name` metadata, layers and wrappers
folded: `block_3/mlp/up/dot_general` and its transpose are both `mlp/up/dot_general`), and
marked `matmul` when its fused computation holds a dot or convolution, so the table reads: what
is not matmul and costs the most.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from jaxtricks.config import override

flags.DEFINE_string("config", "d512", "a config of benchmarks.common.configs")
flags.DEFINE_list("set", [], "overrides key=value, e.g. model.attention.impl=xla")
flags.DEFINE_integer("steps", 5, "traced steps, after 3 warm-up steps")
flags.DEFINE_integer("top", 5, "rows of the printed table")
flags.DEFINE_string("out", "", "JSON output path (none: print only)")
FLAGS = flags.FLAGS

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^ ]* ?([\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_MATMUL_OPS = ("dot", "convolution")
_MATMUL = re.compile(r"\b(dot|convolution)\(")
_LOOP_SCOPES = {"while", "body", "cond", "closed_call", "scan"}
_WRAPPERS = re.compile(r"^(jvp|transpose|vmap|remat|checkpoint|pjit|jit)\((.*)\)$")


def source_op(op_name: str) -> str:
  """`jit(step)/transpose(jvp(Transformer))/.../block_3/mlp/up/dot_general` ->
  `mlp/up/dot_general`: wrappers, the model's class and method scopes, layer indices and loop
  bodies dropped. Ops outside the model (the optimizer update) read `step/<op>`."""
  parts = []
  for part in op_name.split("/")[1:]:
    while m := _WRAPPERS.match(part):
      part = m.group(2)
    if (not part or part[0].isupper() or part in _LOOP_SCOPES
        or re.fullmatch(r"\w+_\d+", part)):
      continue
    parts.append(part)
  if len(parts) == 1:
    return f"step/{parts[0]}"
  return "/".join(parts[-3:]) or op_name


def parse_hlo(text: str) -> dict[str, tuple[str, bool]]:
  """Instruction name -> (source op, whether it or its called computation holds a matmul)."""
  bodies: dict[str, list[str]] = collections.defaultdict(list)
  current = None
  for line in text.splitlines():
    if m := _COMP.match(line):
      current = m.group(1)
    elif line.startswith("}"):
      current = None
    elif current:
      bodies[current].append(line)
  out = {}
  for lines in bodies.values():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      name, opcode = m.groups()
      calls = (c := _CALLS.search(line)) and c.group(1)
      op_name = (o := _OP_NAME.search(line)) and o.group(1)
      called = "\n".join(bodies.get(calls, ())) if calls else ""
      is_mm = opcode in _MATMUL_OPS or bool(_MATMUL.search(called))
      out.setdefault(name, (source_op(op_name) if op_name else name, is_mm))
  return out


def profile(config, steps: int) -> dict:
  """Traces `steps` train steps of `config`: per source op, milliseconds per step and whether
  it is a matmul; the step's wall time."""
  one, _ = common.train_step_runner(config)
  for _ in range(3):
    jax.block_until_ready(one())
  hlo = parse_hlo(one.step.__wrapped__.lower(one.state(), one.batch).compile().as_text())
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    times = []
    for _ in range(steps):
      times.append(common.seconds(one))
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op: dict[tuple[str, bool], float] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in hlo:
      per_op[hlo[e["name"]]] += e["dur"] / 1e3 / steps
  total = sum(per_op.values())
  rows = [{"op": op, "matmul": mm, "ms_per_step": ms, "share": ms / total}
          for (op, mm), ms in sorted(per_op.items(), key=lambda kv: -kv[1])]
  return {"step_s_median": float(np.median(times)), "instructions_ms_per_step": total,
          "matmul_share": sum(r["share"] for r in rows if r["matmul"]), "ops": rows}


def main(argv: list[str]) -> None:
  del argv
  config = common.configs()[FLAGS.config]
  updates = common.parse_overrides(FLAGS.set)
  config = override(config, updates)
  config.validate()
  result = profile(config, FLAGS.steps)
  print(f"{FLAGS.config} {' '.join(FLAGS.set)}: step {result['step_s_median'] * 1e3:.1f} ms "
        f"(median of {FLAGS.steps}), instructions {result['instructions_ms_per_step']:.1f} "
        f"ms/step, matmuls {result['matmul_share']:.1%}")
  non_mm = [r for r in result["ops"] if not r["matmul"]]
  for title, rows in (("all", result["ops"]), ("not matmul", non_mm)):
    print(f"top {FLAGS.top}, {title}:")
    print(f"{'ms/step':>8}{'share':>7}  {'kind':<7}op")
    for r in rows[:FLAGS.top]:
      kind = "matmul" if r["matmul"] else "other"
      print(f"{r['ms_per_step']:>8.1f}{r['share']:>7.1%}  {kind:<7}{r['op']}")
  if FLAGS.out:
    common.write_results({"machine": common.machine_info(), "config": FLAGS.config,
                          "overrides": updates, **result}, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

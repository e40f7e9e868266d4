"""Causal attention at long context: naive, exact blockwise and HyperAttention, time and memory.

    python -m benchmarks.long_context [--lengths=4096,8192,16384,32768] [--repeats=3]
                                      [--out=benchmarks/results/long_context.json]

For each T: batch 1, one head (N = K = 1) of dimension 64, float32, random normal q, k, v, causal.
- naive: ops.attention.attention(causal=True), two einsums around a T x T float32 score matrix
  (T^2 4 bytes), timed only where that matrix is under --naive_max_bytes;
- blockwise: ops.blockwise_attention, exact, the online softmax over key blocks (Rabe and Staats,
  arXiv 2112.05682; FlashAttention, arXiv 2205.14135), causal blocks past the diagonal skipped;
- hyper: ops.hyper_attention (Han et al. 2023, arXiv 2310.05869), sortLSH blocks plus sampled
  columns, the causal recursion down to --hyper_min_seq_len (a T at or below it is exact).
Each program is compiled ahead of time; one warm-up run precedes --repeats timed forward runs
(median reported). Temp bytes are XLA's `memory_analysis().temp_size_in_bytes` of the compiled
forward (compiled for every T, naive included, run or not), set against the score matrix.
HyperAttention's error is ||hyper - blockwise||_F / ||blockwise||_F, on two inputs: random q and
k, whose attention is diffuse (no few large entries for the LSH to find; the exact output is an
average of nearly all values, of norm ~ sqrt(H / T), while m sampled columns estimate it with
error ~ sqrt(H / m)), a hard case for it; and clustered q and k (each position one of T / 64
random centres plus noise of 0.1, the same values), whose attention puts about 90% of each row's
mass on the position's cluster, the case the method is built for (7-bit LSH then puts about 65%
of the same-cluster query-key pairs into one block). Writes the JSON and a
PNG of time against T (log-log) next to it.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from jaxtricks.errors import ConfigError
from jaxtricks.ops.attention import attention
from jaxtricks.ops.blockwise_attention import blockwise_attention
from jaxtricks.ops.hyper_attention import hyper_attention

flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768"], "sequence lengths T")
flags.DEFINE_integer("repeats", 3, "timed forward runs per point (median reported)")
flags.DEFINE_integer("naive_max_bytes", 2**32, "naive runs only where its T x T float32 score "
                     "matrix is under this (its compiled forward's temp is about 2 of them)")
flags.DEFINE_integer("head_dim", 64, "head dimension H")
flags.DEFINE_integer("block_q", 512, "blockwise query block")
flags.DEFINE_integer("block_k", 512, "blockwise key block")
flags.DEFINE_integer("hyper_block", 256, "HyperAttention block_size")
flags.DEFINE_integer("hyper_samples", 256, "HyperAttention sampled key columns")
flags.DEFINE_integer("hyper_min_seq_len", 4096, "HyperAttention exact at or below this length")
flags.DEFINE_integer("seed", 0, "HyperAttention seed")
flags.DEFINE_string("out", "benchmarks/results/long_context.json", "JSON output path (PNG beside)")
FLAGS = flags.FLAGS


def compiled_forward(fn, x) -> tuple[object, int, float]:
  """(compiled program, its temp bytes, compile seconds) for q = k = v shaped like x."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(x, x, x).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t0


def timed(compiled, q, k, v, repeats: int) -> tuple[float, list[float], jnp.ndarray]:
  """(median seconds, the timed runs, the output of the warm-up run)."""
  out = jax.block_until_ready(compiled(q, k, v))
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    runs.append(time.perf_counter() - t0)
  return statistics.median(runs), runs, out


def recursion_levels(t: int, min_seq_len: int) -> int:
  levels = 0
  while t > min_seq_len:
    t, levels = t // 2, levels + 1
  return levels


def rel_error(out, exact: np.ndarray) -> float:
  return float(np.linalg.norm(np.asarray(out, np.float64) - exact) / np.linalg.norm(exact))


def clustered(rng: np.random.Generator, t: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """q and k of positions drawn from T / 64 random centres, plus noise of scale 0.1."""
  centres = rng.standard_normal((max(t // 64, 1), FLAGS.head_dim))
  c = rng.integers(0, len(centres), t)
  noisy = lambda: centres[c] + 0.1 * rng.standard_normal((t, FLAGS.head_dim))  # noqa: E731
  return tuple(jnp.asarray(noisy()[None, :, None], jnp.float32) for _ in range(2))


def bench_length(t: int) -> dict:
  rng = np.random.default_rng(t)
  q, k, v = (jnp.asarray(rng.standard_normal((1, t, 1, FLAGS.head_dim)), jnp.float32)
             for _ in range(3))
  x = jax.ShapeDtypeStruct(q.shape, q.dtype)
  fns = {
      "naive": lambda q, k, v: attention(q, k, v, causal=True),
      "blockwise": lambda q, k, v: blockwise_attention(q, k, v, block_q=FLAGS.block_q,
                                                       block_k=FLAGS.block_k),
      "hyper": lambda q, k, v: hyper_attention(
          q, k, v, block_size=FLAGS.hyper_block, samples=FLAGS.hyper_samples, seed=FLAGS.seed,
          min_seq_len=FLAGS.hyper_min_seq_len),
  }
  scores = t * t * 4
  row = {"T": t, "score_matrix_bytes": scores,
         "hyper_recursion_levels": recursion_levels(t, FLAGS.hyper_min_seq_len)}
  outs = {}
  for name, fn in fns.items():
    compiled, temp, compile_s = compiled_forward(fn, x)
    row[f"{name}_temp_bytes"] = temp
    row[f"{name}_temp_over_scores"] = temp / scores
    row[f"{name}_compile_s"] = compile_s
    row[f"{name}_s"] = row[f"{name}_s_runs"] = None
    if name != "naive" or scores < FLAGS.naive_max_bytes:
      row[f"{name}_s"], row[f"{name}_s_runs"], outs[name] = timed(compiled, q, k, v,
                                                                  FLAGS.repeats)
    del compiled
  exact = np.asarray(outs["blockwise"], np.float64)
  row["hyper_rel_error"] = rel_error(outs["hyper"], exact)
  qc, kc = clustered(rng, t)
  exact_c = np.asarray(jax.jit(fns["blockwise"])(qc, kc, v), np.float64)
  row["hyper_rel_error_clustered"] = rel_error(jax.jit(fns["hyper"])(qc, kc, v), exact_c)
  if "naive" in outs:
    row["blockwise_naive_max_abs_diff"] = float(np.abs(np.asarray(outs["naive"]) - exact).max())
  row["blockwise_over_naive"] = row["blockwise_s"] / row["naive_s"] if row["naive_s"] else None
  row["hyper_over_blockwise"] = row["hyper_s"] / row["blockwise_s"]
  return row


def format_table(rows: list[dict]) -> str:
  ms = lambda s: "-" if s is None else f"{1e3 * s:.1f}"  # noqa: E731
  ratio = lambda r: "-" if r is None else f"{r:.2f}"  # noqa: E731
  head = (f"{'T':>7}{'naive ms':>10}{'block ms':>10}{'hyper ms':>10}{'block/naive':>13}"
          f"{'hyper/block':>13}{'hyper err':>11}{'clustered':>11}{'block temp MiB':>16}"
          f"{'temp/scores':>13}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['T']:>7}{ms(r['naive_s']):>10}{ms(r['blockwise_s']):>10}"
                 f"{ms(r['hyper_s']):>10}{ratio(r['blockwise_over_naive']):>13}"
                 f"{ratio(r['hyper_over_blockwise']):>13}{r['hyper_rel_error']:>11.3f}"
                 f"{r['hyper_rel_error_clustered']:>11.3f}"
                 f"{r['blockwise_temp_bytes'] / 2**20:>16.1f}"
                 f"{r['blockwise_temp_over_scores']:>13.4f}")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str | None:
  try:
    from jaxtricks.plotting import plot_loglog  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return None
  series = {}
  for name, fmt in (("naive", "o-"), ("blockwise", "s-"), ("hyper", "^-")):
    points = [(r["T"], r[f"{name}_s"]) for r in rows if r[f"{name}_s"] is not None]
    if points:
      series[name] = ([p[0] for p in points], [p[1] for p in points], fmt)
  return plot_loglog(series, path, "sequence length T", "forward time (s)")


def main(argv: list[str]) -> None:
  del argv
  machine = common.machine_info()
  lengths = [int(t) for t in FLAGS.lengths]
  if min(lengths) < 1 or FLAGS.repeats < 1:
    raise app.UsageError("bad flags: a length or --repeats < 1")
  rows = []
  for t in lengths:
    try:
      row = bench_length(t)
    except ConfigError as e:
      raise app.UsageError(str(e)) from e
    rows.append(row)
    print(f"T {t}: blockwise {row['blockwise_s']:.3f} s, hyper {row['hyper_s']:.3f} s", flush=True)
  print(f"\nbatch 1, 1 head of {FLAGS.head_dim}, float32, causal; blocks {FLAGS.block_q}x"
        f"{FLAGS.block_k}; hyper block {FLAGS.hyper_block}, samples {FLAGS.hyper_samples}, "
        f"min_seq_len {FLAGS.hyper_min_seq_len}; {machine['cpu_count']} CPUs, load average at "
        f"start {machine['load_average_at_start'][0]:.1f}")
  print(format_table(rows))
  png = plot(rows, FLAGS.out.rsplit(".", 1)[0] + ".png")
  common.write_results({
      "machine": machine,
      "settings": {"lengths": lengths, "repeats": FLAGS.repeats, "batch": 1, "heads": 1,
                   "head_dim": FLAGS.head_dim, "dtype": "float32", "causal": True,
                   "naive_max_bytes": FLAGS.naive_max_bytes, "block_q": FLAGS.block_q,
                   "block_k": FLAGS.block_k, "hyper_block": FLAGS.hyper_block,
                   "hyper_samples": FLAGS.hyper_samples,
                   "hyper_min_seq_len": FLAGS.hyper_min_seq_len, "seed": FLAGS.seed},
      "temp_bytes": "compiled forward's memory_analysis().temp_size_in_bytes",
      "hyper_rel_error": "||hyper - blockwise||_F / ||blockwise||_F (random q, k)",
      "hyper_rel_error_clustered": "the same for clustered q, k (see the module docstring)",
      "plot": png,
      "results": rows,
  }, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

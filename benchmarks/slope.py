"""Train-step time and memory of SLoPe's variants (Mozaffari et al. 2024, arXiv 2405.16325).

    python -m benchmarks.slope [--d_model=256] [--n_layers=4] [--batch=8] [--seq_len=256]
                               [--steps=10] [--out=benchmarks/results/slope.json]

For dense, SLoPe 2:4, SLoPe 2:4 with rank-r adapters, SR-STE 2:4 and the half-width dense model
(the variants of `--exp=slope`), on one random batch: the median wall time of the jitted sharded
train step (after a compiling warm-up), the bytes of the train state as trained and with the
sparse kernels compressed (measured from the arrays), and the theoretical FLOPs of the linear
layers per token (6 x weights used; N:M kernels count N/M of theirs in all three matmuls, which
only a sparse matmul kernel would realise). XLA has no N:M
sparse matmul, so the sparse variants run masked dense matmuls and are expected to be slower.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
from absl import app, flags
from flax import traverse_util

from benchmarks import common
from experiments.slope import VARIANTS, variant_config
from jaxtricks.config import Config
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.nm_projection import SlopeProjection
from jaxtricks.models import sparse
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train.config import TrainConfig

flags.DEFINE_integer("d_model", 256, "model width")
flags.DEFINE_integer("n_layers", 4, "blocks")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
flags.DEFINE_integer("steps", 10, "timed steps per repeat")
flags.DEFINE_integer("repeats", 3, "timed repeats (median reported)")
flags.DEFINE_integer("adapter_rank", 16, "rank of the adapters variant")
flags.DEFINE_list("variants", list(VARIANTS), "which variants")
flags.DEFINE_string("out", "benchmarks/results/slope.json", "JSON output path")
FLAGS = flags.FLAGS


def linear_flops_per_token(params, leaves, model_config: ModelConfig) -> float:
  """6 x (weights of every matmul used per token): embedding lookups excluded, N:M kernels at
  N/M of their size, adapters at (d_in + d_out) r."""
  total = 0.0
  for path, w in traverse_util.flatten_dict(params).items():
    if path[-1] not in ("kernel", "adapter_l", "adapter_r") or path[0] == "embed":
      continue
    leaf = leaves.get(path)
    total += w.size * (leaf.n / leaf.m if leaf else 1.0)
  return 6 * total


def measure(name: str, base: ModelConfig, tc: TrainConfig) -> dict:
  mc = variant_config(base, name)
  one, _ = common.train_step_runner(Config(model=mc, train=tc))
  jax.block_until_ready(one())  # compile
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
      metrics = one()
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / FLAGS.steps)
  state = jax.device_get(one.state())
  leaves = sparse.nm_leaves(Transformer(mc))
  params = state.params
  packed = sparse.compress_params(params, leaves)
  return {
      "name": name,
      "step_s": statistics.median(times),
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "nonzero_params": sparse.nonzero_params(params, leaves),
      "train_state_bytes": sparse.tree_bytes(params) + sparse.tree_bytes(state.opt_state),
      # SR-STE's pruned weights can come back, so only SLoPe can train on compressed kernels
      "train_state_bytes_compressed": sparse.tree_bytes(
          packed if mc.projection.kind == "slope" else params) + sparse.tree_bytes(state.opt_state),
      "weight_bytes_compressed": sparse.tree_bytes(packed),
      "weight_bytes": sparse.tree_bytes(params),
      "linear_flops_per_token": linear_flops_per_token(params, leaves, mc),
  }


def main(argv) -> None:
  del argv
  base = ModelConfig(d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                     attention=AttentionConfig(n_heads=max(FLAGS.d_model // 64, 1)),
                     projection=SlopeProjection(adapter_rank=FLAGS.adapter_rank))
  tc = TrainConfig(steps=1000, batch_size=FLAGS.batch, seq_len=FLAGS.seq_len, warmup_steps=1)
  rows = [measure(name, base, tc) for name in FLAGS.variants]
  dense = next((r for r in rows if r["name"] == "dense"), rows[0])
  for r in rows:
    r["step_vs_dense"] = r["step_s"] / dense["step_s"]
    r["state_vs_dense"] = r["train_state_bytes_compressed"] / dense["train_state_bytes"]
    r["flops_vs_dense"] = r["linear_flops_per_token"] / dense["linear_flops_per_token"]
  print(f"{'variant':<15} {'step ms':>8} {'x dense':>8} {'state MB':>9} {'x dense':>8} "
        f"{'FLOPs x':>8}")
  for r in rows:
    print(f"{r['name']:<15} {r['step_s'] * 1e3:>8.1f} {r['step_vs_dense']:>8.2f} "
          f"{r['train_state_bytes_compressed'] / 2**20:>9.2f} {r['state_vs_dense']:>8.2f} "
          f"{r['flops_vs_dense']:>8.2f}")
  common.write_results({
      "machine": common.machine_info(),
      "config": {"model": dataclasses.asdict(base), "batch": FLAGS.batch,
                 "seq_len": FLAGS.seq_len, "steps": FLAGS.steps, "repeats": FLAGS.repeats},
      "note": "sparse variants run masked dense matmuls (no N:M kernel in XLA); FLOPs are "
              "theoretical; state bytes count sparse kernels compressed",
      "variants": rows}, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

"""Train-step throughput against this machine's dense matmul peak (model FLOP utilisation).

    python -m benchmarks.train_step [--out=benchmarks/results/train_step.json] [--steps=N]
                                    [--set=model.attention.impl=blockwise,...]

Measures (1) the FLOP/s of a jitted float32 square matmul and (2) for the `--exp=lm` default
preset and a d_model=512 small LM, the real train step (state_shardings, init_state,
make_train_step, jit_train_step on the mesh of MeshConfig(), as the training loop builds it):
tokens/s, model FLOP/s and their ratio to the matmul FLOP/s. `--set` applies the same config
overrides to both configs (e.g. another attention implementation).

Two ratios divide the model FLOP/s of the median step:
  - `ratio`: by the best FLOP/s of the square reference matmul over the whole run (the machine's
    peak, as in MFU). One lucky matmul moves it by 20% between runs;
  - `ratio_shaped`: by the median FLOP/s of the step's own matmul shapes (every distinct forward
    kernel shape: (B T) x d_model x out for the attention projections, the MLP and the
    unembedding), each timed after every timed step, so they see the same interference as the
    steps. Being a median of many, it moves far less from run to run.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, arXiv 2204.02311, appendix B):
6 N + 12 L H Q T, with N the matmul parameters (every Linear kernel: attention, MLP and the
unembedding; not the embedding table, not norm scales), L layers, H query heads, Q head dim and T
the sequence length. The attention term counts the full T x T score matrix, as PaLM does: no
halving for the causal mask.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from benchmarks.common import configs, seconds
from jaxtricks.config import Config, override
from jaxtricks.models.transformer import ModelConfig

flags.DEFINE_string("out", "benchmarks/results/train_step.json", "JSON output path")
flags.DEFINE_integer("steps", 10, "timed train steps per config (after 2 warm-up steps)")
flags.DEFINE_integer("matmul_n", 2048, "size of the square reference matmul")
flags.DEFINE_list("set", [], "overrides key=value for both configs, e.g. model.attention.impl=xla")
FLAGS = flags.FLAGS

WARMUP = 2
MATMULS_PER_STEP = 3


def matmul_fn(m: int, k: int, n: int) -> tuple[Callable[[], jax.Array], int]:
  """A jitted float32 (m, k) @ (k, n) matmul, warmed up, and its FLOPs."""
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  for _ in range(WARMUP):
    f(a, b).block_until_ready()
  return lambda: f(a, b), 2 * m * k * n


def kernels(params) -> list[jax.Array]:
  """The model's Linear kernels (every `kernel` leaf: attention, MLP, unembedding)."""
  return [x for path, x in jax.tree_util.tree_leaves_with_path(params)
          if jax.tree_util.keystr(path).endswith("['kernel']")]


def kernel_shapes(params) -> list[tuple[int, int]]:
  """The distinct (in, out) shapes of the model's Linear kernels, leading axes folded into out."""
  return sorted({(int(x.shape[0]), int(np.prod(x.shape[1:]))) for x in kernels(params)})


def model_flops_per_token(cfg: ModelConfig, n_matmul: int, seq_len: int) -> tuple[int, int]:
  """(6 N, 12 L H Q T): the dense and attention terms of the PaLM formula."""
  return 6 * n_matmul, 12 * cfg.n_layers * cfg.attention.n_heads * cfg.dim_per_head * seq_len


def bench_config(config: Config, steps: int) -> dict:
  """Times the jitted train step exactly as jaxtricks.train.loop builds it."""
  config.validate()
  tc = config.train
  one, params = common.train_step_runner(config)
  n_matmul = sum(int(np.prod(x.shape)) for x in kernels(params))

  first_s = seconds(one)  # compilation and the first step
  for _ in range(WARMUP - 1):
    seconds(one)
  matmul, mm_flops = matmul_fn(FLAGS.matmul_n, FLAGS.matmul_n, FLAGS.matmul_n)
  tokens_per_step = tc.batch_size * tc.seq_len
  shapes = kernel_shapes(params)
  own = [matmul_fn(tokens_per_step, k, n) for k, n in shapes]
  times, mm_times, own_rates = [], [], []
  for _ in range(steps):
    times.append(seconds(one))
    mm_times += [seconds(matmul) for _ in range(MATMULS_PER_STEP)]
    own_rates += [flops / seconds(fn) for fn, flops in own]
  step_s = statistics.median(times)
  shaped, shaped_flops = matmul_fn(tokens_per_step, config.model.d_model,
                                   config.model.mlp.width(config.model))
  dense, attn = model_flops_per_token(config.model, n_matmul, tc.seq_len)
  mc = config.model
  return {
      "model": {"d_model": mc.d_model, "n_layers": mc.n_layers,
                "n_heads": mc.attention.n_heads, "head_dim": mc.dim_per_head,
                "d_ff": mc.mlp.width(mc), "vocab_size": mc.vocab_size, "dtype": mc.dtype,
                "attn_impl": mc.attention.impl, "attn_block_size": mc.attention.block_size},
      "batch_size": tc.batch_size, "seq_len": tc.seq_len, "matmul_params": n_matmul,
      "flops_per_token": dense + attn, "flops_per_token_dense": dense,
      "flops_per_token_attention": attn, "first_step_s": first_s,
      "step_s_median": step_s, "step_s_min": min(times), "steps_timed": steps,
      "tokens_per_s": tokens_per_step / step_s,
      "model_flops_per_s": tokens_per_step * (dense + attn) / step_s,
      "model_flops_per_s_best_step": tokens_per_step * (dense + attn) / min(times),
      "matmul_flops_per_s_median": mm_flops / statistics.median(mm_times),
      "matmul_flops_per_s_best": mm_flops / min(mm_times),
      "own_shapes": [[tokens_per_step, k, n] for k, n in shapes],
      "own_matmul_flops_per_s_median": statistics.median(own_rates),
      "own_matmuls_timed": len(own_rates),
      # The config's largest matmul alone (tokens x d_model x d_ff, forward shape), best of 10.
      "shaped_matmul_flops_per_s": shaped_flops / min(seconds(shaped) for _ in range(10)),
  }


def main(argv: list[str]) -> None:
  del argv
  n = FLAGS.matmul_n
  matmul, mm_flops = matmul_fn(n, n, n)
  mm_times = [seconds(matmul) for _ in range(10)]
  updates = common.parse_overrides(FLAGS.set)
  results = {name: bench_config(override(config, updates), FLAGS.steps)
             for name, config in configs().items()}
  peak = max(mm_flops / min(mm_times), *(r["matmul_flops_per_s_best"] for r in results.values()))
  for r in results.values():
    r["ratio_to_matmul"] = r["model_flops_per_s"] / peak
    r["ratio_best_step"] = r["model_flops_per_s_best_step"] / peak
    r["ratio_shaped"] = r["model_flops_per_s"] / r["own_matmul_flops_per_s_median"]

  print(f"float32 matmul {n}^3: peak (best of the run) {peak / 1e9:.1f} GFLOP/s; alone before the "
        f"configs: best {mm_flops / min(mm_times) / 1e9:.1f}, median "
        f"{mm_flops / statistics.median(mm_times) / 1e9:.1f} of 10")
  print("model FLOPs/token = 6 N + 12 L H Q T (PaLM app. B: full T x T attention, no causal "
        "halving); N = matmul weights incl. unembedding, excl. embedding table")
  print("ratio = median step / peak; best = best step / peak; mm: the reference matmul between "
        "the config's steps; shaped: its (B T) x d_model x d_ff matmul alone (1e9 FLOP/s); "
        "own: median of the step's own kernel shapes timed between its steps; r/own = median "
        "step / own")
  head = (f"{'config':<11}{'B x T':>10}{'N':>12}{'MFLOP/tok':>10}{'step s':>8}{'tok/s':>8}"
          f"{'GFLOP/s':>9}{'mm med':>8}{'mm best':>8}{'ratio':>7}{'best':>7}{'shaped':>8}"
          f"{'own':>7}{'r/own':>7}")
  print(head)
  print("-" * len(head))
  for name, r in results.items():
    print(f"{name:<11}{r['batch_size']:>4} x {r['seq_len']:<4}{r['matmul_params']:>12,}"
          f"{r['flops_per_token'] / 1e6:>10.1f}{r['step_s_median']:>8.3f}"
          f"{r['tokens_per_s']:>8.0f}{r['model_flops_per_s'] / 1e9:>9.1f}"
          f"{r['matmul_flops_per_s_median'] / 1e9:>8.1f}{r['matmul_flops_per_s_best'] / 1e9:>8.1f}"
          f"{r['ratio_to_matmul']:>7.1%}{r['ratio_best_step']:>7.1%}"
          f"{r['shaped_matmul_flops_per_s'] / 1e9:>8.1f}"
          f"{r['own_matmul_flops_per_s_median'] / 1e9:>7.1f}{r['ratio_shaped']:>7.1%}")

  out = {
      "machine": common.machine_info(),
      "matmul": {"n": n, "dtype": "float32", "peak_flops_per_s": peak,
                 "alone_reps": len(mm_times), "alone_flops_per_s_best": mm_flops / min(mm_times),
                 "alone_flops_per_s_median": mm_flops / statistics.median(mm_times)},
      "flops_formula": "6*N_matmul + 12*L*H*Q*T per token (PaLM app. B; no causal halving)",
      "ratio": "model FLOP/s of the median step / peak (best reference matmul of the run)",
      "ratio_shaped": "model FLOP/s of the median step / median FLOP/s of the step's own kernel "
                      "shapes, timed between its steps",
      "overrides": updates,
      "configs": results,
  }
  common.write_results(out, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

"""The cost of each trick per training step: the `--exp=lm` default step, then the same step with
one trick switched on, as a ratio to the plain step measured beside it.

    python -m benchmarks.trick_cost [--out=benchmarks/results/trick_cost.json] [--steps=N]
                                    [--rounds=R] [--tricks=gqa,mqa,...]

Every step is the real jitted, sharded train step (jaxtricks.train.build, as the loop runs it) on
one fixed batch. Shared CPUs drift, so the plain step and each trick's step alternate: R rounds of
N plain steps then N trick steps, and a trick's ratio is the median of its steps over the median
of the plain steps of the same rounds. LoRA is timed from scratch (a random frozen base): the
step cost does not depend on where the base came from.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags

from benchmarks import common
from experiments import lm
from jaxtricks.config import override

# Each trick alone on the `lm` default model, as command-line overrides.
TRICKS = {
    "gqa2": {"model.attention.n_kv_heads": 2},
    "mqa": {"model.attention.n_kv_heads": 1},
    "cla2": {"model.attention.kv_sharing": 2},
    "mtp4": {"model.mtp.heads": 4, "train.loss": "mtp"},
    "kan_ffn": {"model.mlp": "kan", "model.mlp.d_ff": 64},
    "slope_2of4": {"model.projection": "slope"},
    "srste_2of4": {"model.projection": "srste"},
    "neftune": {"model.embed": "neftune", "model.embed.neftune_alpha": 5.0},
    "lora": {"model.projection": "lora"},
    "linear_attention": {"model.attention": "linear"},
    "prepbn": {"model.norm": "prepbn"},
    "cosine_reg": {"model.regulariser": "cosine"},
}

flags.DEFINE_string("out", "benchmarks/results/trick_cost.json", "JSON output path")
flags.DEFINE_integer("steps", 5, "timed steps per round, plain and trick each")
flags.DEFINE_integer("rounds", 3, "alternating rounds per trick")
flags.DEFINE_list("tricks", list(TRICKS), f"tricks to time, of {', '.join(TRICKS)}")
FLAGS = flags.FLAGS


def step_seconds(one, n: int) -> list[float]:
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(one())
    out.append(time.perf_counter() - t0)
  return out


def main(argv: list[str]) -> None:
  del argv
  unknown = [t for t in FLAGS.tricks if t not in TRICKS]
  if unknown:
    raise app.UsageError(f"unknown tricks {unknown}; valid: {', '.join(TRICKS)}")
  base = lm.get_config("default")
  tokens_per_step = base.train.batch_size * base.train.seq_len
  plain, _ = common.train_step_runner(base)
  step_seconds(plain, 2)  # compile and warm up
  rows = {}
  for name in FLAGS.tricks:
    config = override(base, TRICKS[name])
    trick, params = common.train_step_runner(config)
    t0 = time.perf_counter()
    step_seconds(trick, 1)
    compile_s = time.perf_counter() - t0
    step_seconds(trick, 1)
    plain_s, trick_s = [], []
    for _ in range(FLAGS.rounds):
      plain_s += step_seconds(plain, FLAGS.steps)
      trick_s += step_seconds(trick, FLAGS.steps)
    p, t = statistics.median(plain_s), statistics.median(trick_s)
    rows[name] = {"overrides": TRICKS[name], "plain_step_s": p, "step_s": t, "ratio": t / p,
                  "tokens_per_s": tokens_per_step / t, "plain_tokens_per_s": tokens_per_step / p,
                  "first_step_s": compile_s,
                  "trained_params": sum(int(x.size) for x in jax.tree.leaves(params))}
    print(f"{name}: {t / p:.2f}x the plain step ({t * 1e3:.1f} ms against {p * 1e3:.1f} ms)",
          flush=True)

  print(f"\n`--exp=lm` default step (B x T = {base.train.batch_size} x {base.train.seq_len}), "
        f"each trick alone; median of {FLAGS.rounds} x {FLAGS.steps} steps against the plain "
        f"steps alternating with them")
  head = f"{'trick':<18}{'ratio':>7}{'step ms':>9}{'tok/s':>9}{'plain tok/s':>12}{'trained':>10}"
  print(head)
  print("-" * len(head))
  for name, r in rows.items():
    print(f"{name:<18}{r['ratio']:>6.2f}x{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>9.0f}"
          f"{r['plain_tokens_per_s']:>12.0f}{r['trained_params']:>10,}")
  common.write_results({"machine": common.machine_info(), "config": "lm default",
                        "tokens_per_step": tokens_per_step, "steps": FLAGS.steps,
                        "rounds": FLAGS.rounds, "tricks": rows}, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

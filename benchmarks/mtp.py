"""Multi-token prediction costs and gains, measured in one run (arXiv 2404.19737).

    python -m benchmarks.mtp [--out=benchmarks/results/mtp.json] [--workdir=runs/mtp]

1. Train-step time with n=4 transformer heads against n=1 on the same trunk (the jitted step the
   loop runs, memory-efficient loss), for the `--exp=mtp` default model (4 layers) and a deeper
   12-layer one: each extra head is one more layer, so the ratio falls with depth.
2. Temporary memory of the loss's gradient (XLA's compiled memory analysis, nothing runs) for the
   naive loss (every head's logits at once) and the memory-efficient one, n=4, T=2048, d=256, for
   vocabularies 256 .. 32768.
3. Greedy decoding of held-out prompts with 1..n heads against plain greedy `generate` (same
   cache, same prompts): tokens per forward pass and wall-clock speedup. The model is the
   `--exp=mtp` default run in --workdir (trained there first if the directory has none).
4. The issue's pass cost: a verification pass of a 4-token block (and of a (3, 2, 1) tree) over
   a greedy token, the default model at batch 1 and 8, heads in sequence against stacked heads.
5. What a verification pass costs against a greedy pass as the model grows (random weights,
   batch 1): speedup = tokens per forward x greedy ms per token / ms per pass, so a 1.5x speedup
   needs tokens per forward >= 1.5 x that cost ratio. Each extra transformer head is one more
   layer of weights to read and k positions more compute per pass.

`--sections` runs a subset; the JSON keeps the other sections of an earlier run at --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from experiments import mtp
from experiments.mtp import timed
from jaxtricks.data.sources import held_out_prompts
from jaxtricks.decode import generate, speculative_generate
from jaxtricks.decode_tree import tree_generate
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.mlp import SwiGLUConfig
from jaxtricks.layers.mtp import TransformerHeads
from jaxtricks.models.transformer import Transformer
from jaxtricks.ops.mtp import loss_temp_bytes
from jaxtricks.train.loop import train

flags.DEFINE_string("out", "benchmarks/results/mtp.json", "JSON output path")
flags.DEFINE_string("workdir", "runs/mtp", "workdir of the --exp=mtp default run to decode with")
flags.DEFINE_integer("steps", 8, "timed train steps per config")
flags.DEFINE_integer("repeats", 3, "timed decoding calls per setting (best is kept)")
SECTIONS = ("step", "memory", "decode", "block_cost", "pass_cost")
flags.DEFINE_list("sections", list(SECTIONS), "sections to run")
FLAGS = flags.FLAGS


def make_step(config):
  """A closure running one train step (built as the loop builds it) and returning its seconds."""
  step, _ = common.train_step_runner(config)

  def one() -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    return time.perf_counter() - t0
  return one


def step_overhead(steps: int) -> list[dict]:
  """n=4 against n=1, steps interleaved so both see the same machine load; medians."""
  base = mtp.get_config("default")
  rows = []
  for name, model in (("default d128 L4", base.model),
                      ("deep d128 L12", dataclasses.replace(base.model, n_layers=12))):
    run = {n: make_step(dataclasses.replace(base, model=dataclasses.replace(
        model, mtp=dataclasses.replace(model.mtp, heads=n)))) for n in (1, 4)}
    for n in (1, 4):  # compilation and one warm-up step
      run[n](), run[n]()
    times = {1: [], 4: []}
    for _ in range(steps):
      for n in (1, 4):
        times[n].append(run[n]())
    t = {n: statistics.median(v) for n, v in times.items()}
    rows.append({"model": name, "step_s_n1": t[1], "step_s_n4": t[4], "ratio": t[4] / t[1],
                 "steps_timed": steps})
    print(f"  step {name}: n=1 {t[1] * 1e3:.1f} ms, n=4 {t[4] * 1e3:.1f} ms, "
          f"ratio {t[4] / t[1]:.2f}")
  return rows


def loss_memory() -> list[dict]:
  rows = []
  for vocab in (256, 4096, 32768):
    naive = loss_temp_bytes(4, 1, 2048, 256, vocab, efficient=False)
    fused = loss_temp_bytes(4, 1, 2048, 256, vocab, efficient=True)
    rows.append({"vocab": vocab, "n": 4, "seq_len": 2048, "d_model": 256,
                 "naive_bytes": naive, "efficient_bytes": fused, "ratio": fused / naive,
                 "one_logits_bytes": 2048 * vocab * 4})
  return rows


def decoding(workdir: str, repeats: int) -> tuple[list[dict], dict]:
  config = mtp.get_config("default")
  result = train(config, workdir, exp="mtp")  # resumes a finished run at once
  params = jax.device_get(result.state.params)
  prompts = held_out_prompts(result.source, config.spec_prompts, config.spec_prompt_len)
  n_new = config.spec_new_tokens
  rows, greedy_s = [], {}
  for batch in (prompts, prompts[:1]):
    b = len(batch)
    plain, t_plain = timed(lambda batch=batch: generate(result.model, params, batch, n_new),
                               repeats)
    greedy_s[b] = t_plain
    for k in range(1, config.model.mtp.heads + 1):
      spec, t = timed(lambda k=k, batch=batch: speculative_generate(
          result.model, params, batch, n_new, n_heads=k), repeats)
      rows.append({"batch": b, "heads": k, "tokens_per_forward": spec.tokens_per_forward,
                   "acceptance_per_position": list(spec.acceptance_per_position),
                   "seconds": t, "speedup_vs_greedy": t_plain / t,
                   "ms_per_pass": 1e3 * t / spec.forward_passes,
                   "greedy_ms_per_pass": 1e3 * t_plain / plain.forward_passes,
                   "identical_to_greedy": bool(np.array_equal(spec.tokens, plain.tokens))})
  info = {"prompt_len": config.spec_prompt_len, "new_tokens": n_new, "greedy_seconds": greedy_s,
          "val_loss_head1": result.summary["val_metrics"]["loss_head1"]}
  return rows, info


def block_cost(repeats: int, new_tokens: int = 64) -> list[dict]:
  """The issue's measure: the verification pass of a block of 4 tokens (and of the (3, 2, 1)
  tree's 16 nodes) over a greedy token, for the `--exp=mtp` default model (random weights: the
  cost of a pass does not depend on what it accepts) at batch 1 and 8, with the extra head layers
  run in sequence (before) and as one stacked layer vmapped over the heads (after)."""
  cfg = mtp.get_config("default").model
  layouts = {"heads in sequence": Transformer(cfg), "stacked heads": Transformer(
      dataclasses.replace(cfg, mtp=dataclasses.replace(cfg.mtp, stacked_decode=True)))}
  params = jax.jit(layouts["stacked heads"].init)(jax.random.key(0),
                                                  jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  rows = []
  for batch in (1, 8):
    prompts = [list(rng.integers(0, 256, 64)) for _ in range(batch)]
    plain, t_plain = timed(lambda m=layouts["heads in sequence"], b=prompts: generate(
        m, params, b, new_tokens), repeats)
    greedy_s = t_plain / plain.forward_passes
    for layout, model in layouts.items():
      row = {"batch": batch, "layout": layout, "greedy_ms_per_token": 1e3 * greedy_s}
      for name, fn in (("chain k=4", lambda m=model, b=prompts: speculative_generate(
          m, params, b, new_tokens)), ("tree 3-2-1", lambda m=model, b=prompts: tree_generate(
              m, params, b, new_tokens, tree=(3, 2, 1)))):
        gen, t = timed(fn, repeats)
        row[name] = t / gen.forward_passes / greedy_s
      rows.append(row)
      print(f"  batch {batch} {layout:<17}: greedy {1e3 * greedy_s:.2f} ms/token; pass / greedy "
            f"token: chain k=4 {row['chain k=4']:.2f}, tree 3-2-1 {row['tree 3-2-1']:.2f}")
  return rows


PASS_COST_MODELS = ((128, 4), (512, 4), (1024, 4), (512, 12), (384, 12))  # (d_model, n_layers)


def pass_cost(repeats: int, new_tokens: int = 64) -> list[dict]:
  """Batch-1 greedy and speculative decoding of random models of growing size (4 transformer
  heads, 64-byte random prompt): ms per greedy token, ms per verification pass, their ratio."""
  rows = []
  prompt = [list(np.random.default_rng(0).integers(0, 256, 64))]
  for d, layers in PASS_COST_MODELS:
    cfg = mtp.get_config("default").model
    cfg = dataclasses.replace(cfg, d_model=d, n_layers=layers,
                              attention=AttentionConfig(n_heads=d // 64), mlp=SwiGLUConfig(),
                              mtp=TransformerHeads(heads=4))
    model = Transformer(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    plain, t_plain = timed(lambda m=model, p=params: generate(m, p, prompt, new_tokens),
                           repeats)
    greedy_ms = 1e3 * t_plain / plain.forward_passes
    row = {"d_model": d, "n_layers": layers, "param_bytes": int(sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(params))),
           "greedy_ms_per_token": greedy_ms, "pass_cost_ratio": {}}
    for k in (2, 3, 4):
      spec, t = timed(lambda k=k, m=model, p=params: speculative_generate(
          m, p, prompt, new_tokens, n_heads=k), repeats)
      row["pass_cost_ratio"][k] = 1e3 * t / spec.forward_passes / greedy_ms
    rows.append(row)
    ratios = " ".join(f"k={k}: {r:.2f}" for k, r in row["pass_cost_ratio"].items())
    print(f"  d={d} L={layers} ({row['param_bytes'] / 1e6:.0f} MB): greedy "
          f"{greedy_ms:.2f} ms/token; pass / greedy pass {ratios}")
  return rows


def main(argv: list[str]) -> None:
  del argv
  unknown = set(FLAGS.sections) - set(SECTIONS)
  if unknown:
    raise app.UsageError(f"unknown --sections {sorted(unknown)}")
  out = {}
  if os.path.exists(FLAGS.out):  # sections not run now keep their earlier figures
    with open(FLAGS.out) as f:
      out = json.load(f)
  out.setdefault("machine_by_section", {})
  machine = common.machine_info()
  if "step" in FLAGS.sections:
    print("1. train step, n=4 transformer heads vs n=1, same trunk")
    out["train_step"] = step_overhead(FLAGS.steps)
  if "memory" in FLAGS.sections:
    print("2. loss gradient temporary memory (XLA memory analysis), n=4, T=2048, d=256")
    out["loss_memory"] = memory = loss_memory()
    print(f"  {'vocab':>6} {'naive MiB':>10} {'efficient MiB':>14} {'ratio':>6}")
    for r in memory:
      print(f"  {r['vocab']:>6} {r['naive_bytes'] / 2**20:>10.1f} "
            f"{r['efficient_bytes'] / 2**20:>14.1f} {r['ratio']:>6.2f}")
  if "decode" in FLAGS.sections:
    print(f"3. greedy decoding with 1..n heads, the --exp=mtp default model in {FLAGS.workdir}")
    decode, info = decoding(FLAGS.workdir, FLAGS.repeats)
    out["decoding"], out["decoding_setup"] = decode, info
    print(f"  held-out prompts of {info['prompt_len']} bytes, {info['new_tokens']} new tokens")
    print(f"  {'batch':>5} {'heads':>5} {'tok/fwd':>8} {'ms/pass':>8} {'greedy ms/pass':>14} "
          f"{'speedup':>8} {'identical':>9}  acceptance per position")
    for r in decode:
      acc = " ".join(f"{a:.2f}" for a in r["acceptance_per_position"])
      print(f"  {r['batch']:>5} {r['heads']:>5} {r['tokens_per_forward']:>8.2f} "
            f"{r['ms_per_pass']:>8.3f} {r['greedy_ms_per_pass']:>14.3f} "
            f"{r['speedup_vs_greedy']:>7.2f}x {r['identical_to_greedy']!s:>9}  {acc}")
  if "block_cost" in FLAGS.sections:
    print("4. verification pass of a 4-token block (and a 3-2-1 tree) over a greedy token, "
          "default model, heads in sequence (before) and stacked (after); targets 1.6 / 3.0")
    out["block_cost"] = block_cost(max(FLAGS.repeats, 5))
  if "pass_cost" in FLAGS.sections:
    print("5. verification pass against greedy pass, batch 1, random models of growing size")
    out["pass_cost"] = pass_cost(FLAGS.repeats)
  for section in FLAGS.sections:
    out["machine_by_section"][section] = machine
  out["machine"] = machine
  common.write_results(out, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

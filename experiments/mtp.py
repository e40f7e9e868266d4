"""Multi-token prediction (Gloeckle et al. 2024, arXiv 2404.19737): n heads on a shared trunk,
trained with the memory-efficient loss, then used as their own drafter (self-speculative decoding).

    python launch.py --exp=mtp                   # default preset: n=4 on Python source, ~3 min
    python launch.py --exp=mtp --preset=smoke    # under a minute
    python launch.py --exp=mtp --preset=compare  # n=1 against n=4 at equal compute
    python launch.py --exp=mtp --preset=heads    # next-token only against every head kind
                                                 # (n=4) at equal blocks, steps and tokens
    python launch.py --exp=mtp --preset=deep     # 12 layers, d 384: about 30 min on 2 cores,
                                                 # large enough for batch-1 decoding to be
                                                 # memory-bound, where drafting pays on a CPU
    python launch.py --exp=mtp --preset=induction | --preset=polynomial   # synthetic tasks

Trains on the embedded corpus (byte level), then measures on held-out files: each head's loss
and accuracy; greedy self-speculative decoding with all heads, as a chain and (where the heads
draft in parallel) with tree verification of `tree`, against plain greedy decoding with the same
cache and prompts, for the batch of `spec_prompts` prompts and each prompt alone (tokens per
forward pass, acceptance per draft position, pass cost in greedy tokens, wall-clock speedup,
whether the outputs are identical, the fastest lossless decoding, and why a decoding is slower
than greedy when it is); XLA's temporary memory of the naive and the memory-efficient loss; a
sample of generated code. The paper's 7B code model reaches 3.50 tokens per forward with 4
heads; a few CPU minutes of training give less (README has the measured value).

summary.json: heads, val_loss_per_head, val_acc_per_head, spec {tokens_per_forward,
acceptance_per_position, speedup_vs_greedy, pass_cost, identical_to_greedy (the chain at the
larger batch), batch1 (the chain, each prompt alone), methods {batch, batch1} (every decoding),
best {batch, batch1}}, mem {loss_temp_bytes_naive, loss_temp_bytes_efficient}, sample, and with
`compare_heads` or `compare_kinds` a `runs` table; head_losses.png.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from experiments import mtp_text
from experiments.variants import run_variants, variant_key
from jaxtricks import metrics as mlog
from jaxtricks.config import Config, flatten, to_dict
from jaxtricks.data.corpus import DataConfig
from jaxtricks.data.sources import held_out_prompts
from jaxtricks.decode import generate, speculative_generate
from jaxtricks.decode_tree import check_tree, tree_generate
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.mtp import TransformerHeads
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.ops.mtp import loss_temp_bytes
from jaxtricks.registry import kinds
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.loop import RunResult, train

PRESETS = ("smoke", "default", "deep", "compare", "heads", "induction", "polynomial", "full")


@dataclasses.dataclass(frozen=True)
class MtpConfig(Config):
  compare_heads: tuple[int, ...] = ()  # e.g. (1, 4): one run per n, compute-matched if set
  compare_kinds: tuple[str, ...] = ()  # e.g. ("next_token", "linear"): one run per mtp kind
  spec_prompts: int = 8                # held-out prompts for the decoding measurements
  spec_prompt_len: int = 64
  spec_new_tokens: int = 128
  sample_new_tokens: int = 160
  task_examples: int = 64              # polynomial: held-out expressions decoded per setting
  task_ood_ops: tuple[int, ...] = (6, 7)  # polynomial: out-of-distribution operation counts
  tree: tuple[int, ...] = (3, 2, 1)    # tree verification's branching per depth (): chain only


def get_config(preset: str) -> MtpConfig:
  mtp = dict(mtp=TransformerHeads(heads=4))
  heads = lambda n: AttentionConfig(n_heads=n)  # noqa: E731
  train_cfg = TrainConfig(steps=400, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=40,
                          log_every=25, ckpt_every=100, eval_batches=16, loss="mtp")
  if preset == "smoke":
    return MtpConfig(
        model=ModelConfig(d_model=64, n_layers=2, attention=heads(2), **mtp),
        train=TrainConfig(steps=30, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
                          log_every=10, ckpt_every=15, eval_batches=2, loss="mtp"),
        spec_prompts=2, spec_prompt_len=16, spec_new_tokens=24, sample_new_tokens=24)
  if preset == "default":
    return MtpConfig(model=ModelConfig(d_model=128, n_layers=4, attention=heads(4), **mtp),
                     train=train_cfg)
  if preset == "deep":  # 11 trunk layers + 4 heads, 107 MB: batch-1 decoding is memory-bound
    return MtpConfig(
        model=ModelConfig(d_model=384, n_layers=12, attention=heads(6), **mtp),
        train=dataclasses.replace(train_cfg, steps=600, batch_size=16, lr=2e-3,
                                  warmup_steps=60))
  if preset == "compare":
    return MtpConfig(
        model=ModelConfig(d_model=128, n_layers=6, attention=heads(4),
                          mtp=TransformerHeads(heads=4, compute_matched=True)),
        train=dataclasses.replace(train_cfg, steps=300, ckpt_every=0), compare_heads=(1, 4),
        spec_new_tokens=64)
  if preset == "heads":  # every head family, 6 blocks each, equal steps and tokens
    return MtpConfig(
        model=ModelConfig(d_model=128, n_layers=6, attention=heads(4), **mtp),
        train=dataclasses.replace(train_cfg, steps=300, ckpt_every=0),
        compare_kinds=("next_token", "transformer", "linear", "medusa", "sequential"),
        spec_new_tokens=64)
  if preset in ("induction", "polynomial"):
    return MtpConfig(
        model=ModelConfig(d_model=96, n_layers=3, attention=heads(4),
                          mtp=TransformerHeads(heads=2)),
        train=dataclasses.replace(train_cfg, steps=300, ckpt_every=0, batch_size=32),
        data=DataConfig(task=preset), compare_heads=(1, 2), spec_prompt_len=96,
        spec_new_tokens=32, tree=(3,))
  return MtpConfig(
      model=ModelConfig(d_model=1024, n_layers=16, dtype="bfloat16", attention=heads(8), **mtp),
      train=TrainConfig(steps=20_000, batch_size=64, seq_len=1024, lr=1e-3, warmup_steps=1000,
                        log_every=100, ckpt_every=2000, eval_batches=32, loss="mtp"),
      spec_prompts=16, spec_prompt_len=256, spec_new_tokens=256)


def _prompts(result: RunResult, config: MtpConfig) -> list[np.ndarray]:
  return held_out_prompts(result.source, config.spec_prompts, config.spec_prompt_len)


def timed(fn, repeats: int = 2):
  """(the result, the best wall-clock seconds of `repeats` calls after a compiling call)."""
  out = fn()  # compiles
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return out, best


def _decoders(model, params, config: MtpConfig) -> tuple[dict, str]:
  """The lossless greedy decodings to measure, by name (a callable of a batch of prompts): the
  chain with every head and, where the heads can, the tree `config.tree`; and why there is no
  tree otherwise ("" when there is one)."""
  n_new = config.spec_new_tokens
  methods = {"chain": lambda b: speculative_generate(model, params, b, n_new)}
  if not config.tree:
    return methods, "no tree configured (tree=())"
  try:
    check_tree(model, config.tree)
  except ValueError as e:
    return methods, str(e)
  methods[tree_name(config.tree)] = lambda b: tree_generate(model, params, b, n_new,
                                                            tree=config.tree)
  return methods, ""


def tree_name(branching: tuple[int, ...]) -> str:
  return "tree " + "-".join(str(b) for b in branching)


def _measure(model, params, batches: list[list], methods: dict, n_new: int) -> dict:
  """Greedy `generate` against each method on each batch in turn (totals over the batches):
  tokens per forward, speedup, pass cost (seconds per pass over seconds per greedy token), and
  whether the output is greedy's, token for token."""
  plain = [timed(lambda b=b: generate(model, params, b, n_new)) for b in batches]
  t_plain = sum(t for _, t in plain)
  greedy_pass_s = t_plain / sum(g.forward_passes for g, _ in plain)
  out = {"greedy_tokens_per_s": sum(float(g.lengths.sum()) for g, _ in plain) / t_plain,
         "prompts": sum(len(b) for b in batches), "new_tokens": n_new, "methods": {}}
  for name, fn in methods.items():
    runs = [timed(lambda b=b, fn=fn: fn(b)) for b in batches]
    t = sum(s for _, s in runs)
    tokens = sum(float(g.lengths.sum()) for g, _ in runs)
    passes = sum(float(g.lengths.sum()) / g.tokens_per_forward for g, _ in runs)
    row = {"tokens_per_forward": tokens / passes, "speedup_vs_greedy": t_plain / t,
           "tokens_per_s": tokens / t,
           "pass_cost": t / sum(g.forward_passes for g, _ in runs) / greedy_pass_s,
           "identical_to_greedy": all(
               np.array_equal(a.tokens, b.tokens) and np.array_equal(a.lengths, b.lengths)
               for (a, _), (b, _) in zip(plain, runs, strict=True))}
    if len(batches) == 1:
      row["acceptance_per_position"] = list(runs[0][0].acceptance_per_position)
    out["methods"][name] = row
  return out


def best_decoding(measured: dict) -> dict:
  """The fastest lossless method of a `_measure` result, or greedy when none is faster; with a
  plain statement of why a decoding slower than greedy is slower (speedup = tokens per forward /
  pass cost)."""
  lossless = {k: r for k, r in measured["methods"].items() if r["identical_to_greedy"]}
  name = max(lossless, key=lambda k: lossless[k]["speedup_vs_greedy"], default=None)
  notes = []
  for k, r in measured["methods"].items():
    if not r["identical_to_greedy"]:
      notes.append(f"{k} is not lossless (its output differs from greedy's): not counted")
    elif r["speedup_vs_greedy"] < 1:
      notes.append(f"{k} is slower than greedy ({r['speedup_vs_greedy']:.2f}x): a pass costs "
                   f"{r['pass_cost']:.2f} greedy tokens and yields {r['tokens_per_forward']:.2f}")
  if name is None or lossless[name]["speedup_vs_greedy"] < 1:
    return {"method": "greedy", "speedup_vs_greedy": 1.0, "notes": notes}
  return {"method": name, "speedup_vs_greedy": lossless[name]["speedup_vs_greedy"],
          "tokens_per_forward": lossless[name]["tokens_per_forward"], "notes": notes}


def decoding(result: RunResult, config: MtpConfig) -> dict:
  """Self-speculative (chain, and tree where the heads can) against plain greedy decoding: same
  prompts, same cache layout; for the batch of `spec_prompts` prompts and, under `batch1`, for
  each of them decoded alone. The top level keeps the chain's figures at the larger batch."""
  model, params = result.model, jax.device_get(result.state.params)
  prompts, n_new = _prompts(result, config), config.spec_new_tokens
  methods, no_tree = _decoders(model, params, config)
  batched = _measure(model, params, [prompts], methods, n_new)
  alone = _measure(model, params, [[p] for p in prompts], methods, n_new)
  chain = batched["methods"]["chain"]
  out = {"heads_used": model.config.mtp.heads, **chain,
         "prompts": batched["prompts"], "new_tokens": n_new,
         "greedy_tokens_per_s": batched["greedy_tokens_per_s"],
         "batch1": {**alone["methods"]["chain"], "prompts": alone["prompts"],
                    "greedy_tokens_per_s": alone["greedy_tokens_per_s"]},
         "methods": {"batch": batched["methods"], "batch1": alone["methods"]},
         "best": {"batch": best_decoding(batched), "batch1": best_decoding(alone)}}
  if no_tree:
    out["tree_unavailable"] = no_tree
  out["identical_to_greedy"] = all(
      r["identical_to_greedy"] for m in out["methods"].values() for r in m.values())
  return out


def task_scores(result: RunResult, config: MtpConfig) -> dict:
  """Induction: accuracy on the second letters of repeated names (the scored targets).
  Polynomials: exact match of greedily decoded answers, in and out of distribution."""
  val = result.summary["val_metrics"]
  scores = {"task": config.data.task,
            "scored_token_accuracy": val.get("accuracy_head1", val["accuracy"])}
  if config.data.task != "polynomial":
    return scores
  task = result.source
  params = jax.device_get(result.state.params)
  settings = {"in_distribution": (1, config.data.task_ops)}
  settings.update({f"ood_{m}_ops": (m, m) for m in config.task_ood_ops})
  for name, (lo, hi) in settings.items():
    rng = np.random.default_rng([lo, hi, 12345])  # the same expressions for every run
    examples = [task.example(rng, int(rng.integers(lo, hi + 1)))
                for _ in range(config.task_examples)]
    prompts = [list(f"{expr}=".encode()) for expr, _ in examples]
    longest = max(len(a) for _, a in examples) + 1
    gen = generate(result.model, params, prompts, longest, stop_tokens=(ord("\n"),))
    answers = [bytes(row[:n].tolist()).decode("ascii", "replace").rstrip("\n")
               for row, n in zip(gen.tokens, gen.lengths, strict=True)]
    scores[f"exact_match_{name}"] = float(np.mean([a == ref for a, (_, ref) in zip(
        answers, examples, strict=True)]))
  return scores


def _one_run(config: MtpConfig, workdir: str, exp: str) -> dict:
  result = train(config, workdir, exp=exp)
  m, t = config.model, config.train
  n = m.mtp.heads
  val = result.summary["val_metrics"]
  out = {
      "heads": n,
      "params": result.summary["params"],
      "val_loss_per_head": [val.get(f"loss_head{i}", val["loss"]) for i in range(1, n + 1)],
      "val_acc_per_head": [val.get(f"accuracy_head{i}", val["accuracy"])
                           for i in range(1, n + 1)],
      "tokens_per_s": result.summary["tokens_per_s"],
      "train_wall_s": result.summary["wall_s"],
  }
  if m.mtp.can_draft:
    out["spec"] = decoding(result, config)
  out["mem"] = {
      "loss_temp_bytes_naive": loss_temp_bytes(n, t.batch_size, t.seq_len, m.d_model,
                                               m.vocab_size, efficient=False),
      "loss_temp_bytes_efficient": loss_temp_bytes(n, t.batch_size, t.seq_len, m.d_model,
                                                   m.vocab_size, efficient=True),
  }
  if config.data.task:
    out["task"] = task_scores(result, config)
  else:
    params = jax.device_get(result.state.params)
    first = _prompts(result, config)[:1]
    gen = generate(result.model, params, first, config.sample_new_tokens)
    prompt = bytes(first[0].tolist())
    out["sample"] = {"prompt": prompt.decode("utf-8", "replace"),
                     "continuation": bytes(gen.tokens[0, :gen.lengths[0]].tolist())
                     .decode("utf-8", "replace")}
  out["figures"] = _plot(workdir, n)
  return out


def variants(config: MtpConfig) -> dict[str, MtpConfig]:
  """The runs of a comparison: one per `compare_heads` entry (n heads of the configured kind) or
  per `compare_kinds` entry (that kind with the configured n, `next_token` for n = 1); heads
  that are blocks remove as many trunk layers (`compute_matched`), so every run has the same
  blocks; cheap heads (linear, Medusa) keep the whole trunk. Empty when nothing is compared."""
  if config.compare_heads and config.compare_kinds:
    raise ConfigError("set compare_heads or compare_kinds, not both")
  if any(not 1 <= h for h in config.compare_heads):
    raise ConfigError(f"compare_heads={config.compare_heads}: every entry must be >= 1")
  mtp = config.model.mtp
  with_mtp = lambda m: dataclasses.replace(  # noqa: E731
      config, model=dataclasses.replace(config.model, mtp=m))
  if config.compare_heads:
    return {f"n{n}": with_mtp(dataclasses.replace(mtp, heads=n)) for n in config.compare_heads}
  known = kinds("mtp")
  out = {}
  for kind in config.compare_kinds:
    if kind == "next_token":
      out[kind] = with_mtp(TransformerHeads(heads=1))
    elif kind in known:
      cls = known[kind]
      out[kind] = with_mtp(cls(heads=mtp.heads, compute_matched=cls.blocks))
    else:
      raise ConfigError(f"compare_kinds: unknown mtp kind {kind!r}; valid: next_token, "
                        f"{', '.join(known)}")
  return out


def run(config: MtpConfig, workdir: str) -> dict:
  t_start = time.time()
  configs = variants(config)
  for cfg in configs.values():  # refuse a bad config before any training
    cfg.validate()
  os.makedirs(workdir, exist_ok=True)
  if not configs:
    summary = {"exp": "mtp", **_one_run(config, workdir, "mtp")}
  else:
    def one(name: str, directory: str) -> dict:
      cfg = configs[name]
      mtp = cfg.model.mtp
      row = {"variant": name, "kind": mtp.kind, "heads": mtp.heads, "depth": cfg.model.depth,
             "blocks": cfg.model.depth + (mtp.heads - 1 if mtp.blocks else 0),
             **_one_run(cfg, directory, f"mtp/{name}")}
      mlog.log_progress(f"{name}: " + mtp_text.row_text(row))
      return row

    mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="mtp"))
    runs = run_variants(workdir, list(configs), lambda name: variant_key(
        configs[name], ignore=("compare_heads", "compare_kinds")), one, subdir="runs")
    summary = {"exp": "mtp", "runs": runs, **runs[-1]}
    if config.compare_kinds:
      for line in mtp_text.kinds_table(runs):
        mlog.log_progress(line)
  summary.update(steps=config.train.steps, wall_s=time.time() - t_start, config=flatten(config))
  mlog.log_progress(mtp_text.row_text(summary))
  for line in mtp_text.slower_text(summary):
    mlog.log_progress(line)
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def _plot(workdir: str, n: int) -> list[str]:
  try:
    from jaxtricks.plotting import plot_curves  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return []
  keys = [f"loss_head{i}" for i in range(1, n + 1)] if n > 1 else ["loss"]
  keys += [f"val_{k}" for k in keys]
  path = plot_curves(os.path.join(workdir, "metrics.jsonl"), keys,
                     os.path.join(workdir, "head_losses.png"), ylabel="nats per byte")
  return [os.path.relpath(path, workdir)] if path else []

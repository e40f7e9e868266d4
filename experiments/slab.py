"""SLAB (Guo et al. 2024, arXiv 2405.11582) for language models: simplified linear attention,
made causal (jaxtricks.layers.linear_attention), and PRepBN in place of RMSNorm
(jaxtricks.layers.prepbn), against softmax attention with RMSNorm.

    python launch.py --exp=slab                  # default preset, a few minutes on 2 CPU cores
    python launch.py --exp=slab --preset=smoke

Trains, with equal steps and tokens on the embedded corpus, four models of the same depth and
width: softmax attention + RMSNorm (the baseline), softmax + PRepBN (the paper's LLaMA setup),
linear attention + RMSNorm and linear attention + PRepBN (SLAB's combination, beyond the paper:
its linear attention was for vision and non-causal). PRepBN hands RMSNorm over to RepBN during
training (gamma from 1 to 0 between `prepbn_warm` and `prepbn_warm + prepbn_steps`, fractions of
train.steps), so that the trained model folds into a per-channel affine map. Then measures each
one's held-out loss, its decode state bytes per sequence at each of `state_contexts` (the KV
cache of softmax attention grows with the context; the linear state does not), greedy decode
tokens/s with `decode_context` tokens already in the cache (batch `decode_batch`), and, for the
PRepBN models, decode tokens/s folded and unfolded and the cost of one norm call on a
(`norm_tokens`, d_model) activation: RMSNorm, PRepBN with running statistics, and the folded
affine map (same run, median of `timing_repeats`).

summary.json: `variants` = [{name, params, val_loss, state_bytes, decode_tokens_per_s, and for
PRepBN models decode_tokens_per_s_unfolded, fold_max_logit_diff}], `norm_cost_us` {rms, prepbn,
folded}, `decode_context`, `state_contexts`; figure slab.png (val loss against decode tokens/s).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.variants import run_variants, variant_key
from jaxtricks import metrics as mlog
from jaxtricks.config import Config, flatten, override, to_dict
from jaxtricks.decode import decode_state_bytes, init_cache
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.norm import RMSNorm
from jaxtricks.layers.prepbn import STATS, Affine, PRepBN
from jaxtricks.models.merge import merged_params
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.loop import train

PRESETS = ("smoke", "default", "full")
VARIANTS = ("softmax+rms", "softmax+prepbn", "linear+rms", "linear+prepbn")


@dataclasses.dataclass(frozen=True)
class SlabConfig(Config):
  variants: tuple[str, ...] = ()          # empty: all four
  prepbn_warm: float = 0.25               # fraction of train.steps with gamma = 1
  prepbn_steps: float = 0.5               # fraction of train.steps over which gamma decays to 0
  state_contexts: tuple[int, ...] = (1024, 8192, 32768)
  decode_context: int = 8192              # tokens in the cache when decode speed is timed
  decode_batch: int = 1
  decode_new_tokens: int = 64
  norm_tokens: int = 4096                 # rows of the activation the norm cost is timed on
  timing_repeats: int = 20

  def validate(self) -> SlabConfig:
    super().validate()
    unknown = [v for v in self.variants if v not in VARIANTS]
    if unknown:
      raise ConfigError(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    if not (0 <= self.prepbn_warm and 0 < self.prepbn_steps
            and self.prepbn_warm + self.prepbn_steps <= 1):
      raise ConfigError(f"prepbn_warm={self.prepbn_warm} and prepbn_steps={self.prepbn_steps} "
                        f"must be fractions of train.steps with warm >= 0, steps > 0 and "
                        f"warm + steps <= 1 (gamma reaches 0 within training, so it folds)")
    for name in ("decode_context", "decode_batch", "decode_new_tokens", "norm_tokens",
                 "timing_repeats"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.state_contexts or min(self.state_contexts) < 1:
      raise ConfigError(f"state_contexts must be positive lengths, got {self.state_contexts}")
    return self


def get_config(preset: str) -> SlabConfig:
  if preset == "smoke":
    return SlabConfig(
        model=ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=2)),
        train=TrainConfig(steps=8, batch_size=4, seq_len=32, warmup_steps=2, log_every=4,
                          ckpt_every=0, eval_batches=1),
        state_contexts=(1024, 8192, 32768), decode_context=512, decode_new_tokens=8,
        norm_tokens=256, timing_repeats=3)
  if preset == "default":
    return SlabConfig(
        model=ModelConfig(d_model=128, n_layers=4, attention=AttentionConfig(n_heads=4)),
        train=TrainConfig(steps=150, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=15,
                          log_every=25, ckpt_every=0, eval_batches=8))
  return SlabConfig(
      model=ModelConfig(d_model=1024, n_layers=18, dtype="bfloat16",
                        attention=AttentionConfig(n_heads=8)),
      train=TrainConfig(steps=20_000, batch_size=64, seq_len=1024, lr=1.5e-3, warmup_steps=1000,
                        log_every=100, ckpt_every=2000, eval_batches=32),
      decode_batch=8)


def variant_config(config: SlabConfig, name: str) -> SlabConfig:
  attention, norm = name.split("+")
  # Each variant names both kinds; fields given on the command line stay with their kind.
  changes: dict[str, Any] = {"variants": (), "model.norm": norm,
                             "model.attention": "mha" if attention == "softmax" else "linear"}
  if norm == "prepbn":
    steps = config.train.steps
    changes.update({"model.norm": "prepbn",
                    "model.norm.warm": int(config.prepbn_warm * steps),
                    "model.norm.steps": max(1, int(config.prepbn_steps * steps))})
  return override(config, changes)


def decode_tokens_per_s(model: Transformer, variables: dict, context: int, batch: int,
                        new_tokens: int, repeats: int = 3) -> float:
  """Greedy tokens/s of `new_tokens` decode steps with `context` tokens already cached (the
  cache's contents do not change the cost), timed after one compiling call (median)."""
  cache = init_cache(model.config, batch, context + new_tokens)
  cache["lengths"] = jnp.full((batch,), context, jnp.int32)

  @jax.jit
  def run(variables, cache, tok_B):
    def step(carry, _):
      cache, tok_B = carry
      logits_Bx1xV, cache = model.apply(variables, tok_B[:, None], cache, method="decode")
      tok_B = jnp.argmax(logits_Bx1xV[:, 0], axis=-1).astype(jnp.int32)
      return (cache, tok_B), tok_B
    return jax.lax.scan(step, (cache, tok_B), None, length=new_tokens)[1]

  tok_B = jnp.zeros((batch,), jnp.int32)
  return batch * new_tokens / median_seconds(lambda: run(variables, cache, tok_B), repeats)


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `fn()` (its outputs waited for) over `repeats` calls after one more."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _train_variant(config: SlabConfig, name: str, directory: str) -> dict:
  cfg = variant_config(config, name)
  result = train(cfg, directory, exp=f"slab/{name}")
  model = Transformer(cfg.model)
  params = jax.device_get(result.state.model_params())
  collections = jax.device_get(result.state.model_collections())
  row = {
      "name": name,
      "params": result.summary["params"],
      "val_loss": result.summary["val_loss"],
      "state_bytes": {str(c): decode_state_bytes(cfg.model, c) for c in config.state_contexts},
  }
  speed = lambda m, v: decode_tokens_per_s(m, v, config.decode_context, config.decode_batch,  # noqa: E731
                                           config.decode_new_tokens)
  if collections:  # PRepBN: decode the folded model (no statistics), and the unfolded one
    folded_config, folded = merged_params(cfg.model, params, collections=collections)
    folded_model = Transformer(folded_config)
    tokens = jnp.asarray(np.arange(64).reshape(2, 32) % cfg.model.vocab_size, jnp.int32)
    row["fold_max_logit_diff"] = float(jnp.max(jnp.abs(
        model.apply({"params": params, **collections}, tokens)
        - folded_model.apply({"params": folded}, tokens))))
    row["decode_tokens_per_s_unfolded"] = speed(model, {"params": params, **collections})
    row["decode_tokens_per_s"] = speed(folded_model, {"params": folded})
  else:
    row["decode_tokens_per_s"] = speed(model, {"params": params})
  mlog.log_progress(f"{name}: {row}")
  return row


def norm_cost_us(config: SlabConfig) -> dict[str, float]:
  """Microseconds of one norm call on a (norm_tokens, d_model) activation (median): RMSNorm,
  PRepBN in evaluation (running statistics; gamma = 0 still computes its RMSNorm term) and the
  folded affine map."""
  d = config.model.d_model
  x = jax.random.normal(jax.random.key(0), (config.norm_tokens, d), jnp.float32)
  out = {}
  for name, module in (("rms", RMSNorm()), ("prepbn", PRepBN(warm=0, steps=1)),
                       ("folded", Affine())):
    variables = nn.unbox(module.init(jax.random.key(1), x))
    if STATS in variables:  # past the schedule: gamma = 0, as in the trained models
      variables[STATS]["count"] = jnp.asarray(1, jnp.int32)
    fn = jax.jit(lambda v, x, m=module: m.apply(v, x))
    out[name] = 1e6 * median_seconds(lambda f=fn, v=variables: f(v, x), config.timing_repeats)
  return out


def run(config: SlabConfig, workdir: str) -> dict:
  config.validate()
  names = config.variants or VARIANTS
  for name in names:  # refuse a bad config before any training
    variant_config(config, name).validate()
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="slab"))
  rows = run_variants(workdir, names,
                      lambda name: variant_key(variant_config(config, name)),
                      lambda name, directory: _train_variant(config, name, directory))
  summary = {"exp": "slab", "steps": config.train.steps, "variants": rows,
             "norm_cost_us": norm_cost_us(config), "decode_context": config.decode_context,
             "state_contexts": list(config.state_contexts), "wall_s": time.time() - t_start,
             "config": flatten(config)}
  mlog.log_progress(format_table(rows, summary["norm_cost_us"], config))
  plot = _plot(rows, os.path.join(workdir, "slab.png"), config.decode_context)
  if plot:
    summary["figures"] = [os.path.basename(plot)]
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def format_table(rows: list[dict], norm_us: dict, config: SlabConfig) -> str:
  contexts = [str(c) for c in config.state_contexts]
  head = (f"{'variant':<15} {'params':>9} {'val loss':>9} "
          + " ".join(f"{'state@' + c:>13}" for c in contexts)
          + f" {'tok/s@' + str(config.decode_context):>12} {'unfolded':>9}")
  lines = [head]
  for r in rows:
    unfolded = r.get("decode_tokens_per_s_unfolded")
    lines.append(f"{r['name']:<15} {r['params']:>9,} {r['val_loss']:>9.4f} "
                 + " ".join(f"{r['state_bytes'][c]:>13,}" for c in contexts)
                 + f" {r['decode_tokens_per_s']:>12.0f} "
                 + (f"{unfolded:>9.0f}" if unfolded else f"{'-':>9}"))
  base = {r["name"]: r for r in rows}
  if "softmax+rms" in base and "linear+rms" in base:
    ratio = base["linear+rms"]["decode_tokens_per_s"] / base["softmax+rms"]["decode_tokens_per_s"]
    lines.append(f"linear / softmax decode tokens/s at {config.decode_context} context: "
                 f"{ratio:.2f}x")
  lines.append("norm call (us, median): " + ", ".join(f"{k} {v:.1f}" for k, v in norm_us.items()))
  return "\n".join(lines)


def _plot(rows: list[dict], path: str, context: int) -> str | None:
  try:
    from jaxtricks.plotting import plot_labeled_points  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return None
  return plot_labeled_points([(r["name"], r["decode_tokens_per_s"], r["val_loss"]) for r in rows],
                             path, f"greedy decode tokens/s at {context} context",
                             "held-out loss (nats per byte)")

"""Cross-Layer Attention (Brandon et al. 2024, arXiv 2405.12981) against MHA, GQA and MQA.

    python launch.py --exp=cla                   # default preset, a few minutes on 2 CPU cores
    python launch.py --exp=cla --preset=smoke

Trains, with equal steps and tokens on the embedded corpus, six models of the same depth and width:
MHA, GQA (half the K/V heads), MQA, MQA with half the head dimension, MQA-CLA2 and MQA-CLA3; then
measures each one's KV-cache bytes per token, held-out loss, greedy decode tokens/s and the largest
batch whose cache fits `budget_bytes` at `context_len` tokens (from an allocated cache). The paper
(1B models) finds MQA-CLA2 within ~0.5% of MQA's perplexity at half the cache, and better than
MQA with half the head dimension at the same cache size.

summary.json: `variants` = [{name, params, kv_bytes_per_token, val_loss, decode_tokens_per_s,
max_batch_at_context, kv_source}], plus `budget_bytes`, `context_len`; figure cla.png (val loss
against KV bytes per token).
"""

from __future__ import annotations

import dataclasses
import os
import time

from experiments.measure import decode_speed
from experiments.variants import run_variants, variant_key
from jaxtricks import metrics as mlog
from jaxtricks.config import Config, flatten, to_dict
from jaxtricks.decode import cache_bytes, init_cache
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.ops.attention import kv_bytes_per_token
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.loop import train

PRESETS = ("smoke", "default", "full")


def variant_overrides(base: ModelConfig) -> dict[str, dict]:
  """Attention-config changes of each variant relative to the MHA base."""
  h, n = base.dim_per_head, base.attention.n_heads
  return {
      "MHA": dict(n_kv_heads=n),
      f"GQA{max(n // 2, 1)}": dict(n_kv_heads=max(n // 2, 1)),
      "MQA": dict(n_kv_heads=1),
      f"H{h // 2}-MQA": dict(n_kv_heads=1, head_dim=h // 2),
      "MQA-CLA2": dict(n_kv_heads=1, kv_sharing=2),
      "MQA-CLA3": dict(n_kv_heads=1, kv_sharing=3),
  }


def variant_model(base: ModelConfig, changes: dict) -> ModelConfig:
  return dataclasses.replace(base, attention=dataclasses.replace(base.attention, **changes))


@dataclasses.dataclass(frozen=True)
class ClaConfig(Config):
  variants: tuple[str, ...] = ()         # empty: all six
  budget_bytes: int = 1 << 30            # KV-cache memory budget for max_batch_at_context
  context_len: int = 2048
  decode_batch: int = 8
  decode_prompt_len: int = 32
  decode_new_tokens: int = 64


def get_config(preset: str) -> ClaConfig:
  if preset == "smoke":
    return ClaConfig(
        model=ModelConfig(d_model=32, n_layers=4, attention=AttentionConfig(n_heads=4)),
        train=TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, log_every=3,
                          ckpt_every=0, eval_batches=1),
        decode_batch=2, decode_prompt_len=8,
        decode_new_tokens=8, context_len=256)
  if preset == "default":
    return ClaConfig(
        model=ModelConfig(d_model=128, n_layers=6, attention=AttentionConfig(n_heads=4)),
        train=TrainConfig(steps=150, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=15,
                          log_every=25, ckpt_every=0, eval_batches=8))
  return ClaConfig(
      model=ModelConfig(d_model=1024, n_layers=20, dtype="bfloat16",
                        attention=AttentionConfig(n_heads=8, head_dim=128)),
      train=TrainConfig(steps=20_000, batch_size=64, seq_len=1024, lr=1.5e-3, warmup_steps=1000,
                        log_every=100, ckpt_every=2000, eval_batches=32))


def _train_variant(cfg: ClaConfig, name: str, directory: str) -> dict:
  result = train(cfg, directory, exp=f"cla/{name}")
  per_seq = cache_bytes(init_cache(cfg.model, 1, cfg.context_len))
  row = {
      "name": name,
      "params": result.summary["params"],
      "kv_bytes_per_token": kv_bytes_per_token(cfg.model),
      "cache_bytes_per_sequence": per_seq,
      "val_loss": result.summary["val_loss"],
      "decode_tokens_per_s": decode_speed(result, cfg.decode_batch, cfg.decode_prompt_len,
                                          cfg.decode_new_tokens),
      "max_batch_at_context": cfg.budget_bytes // per_seq,
      "kv_source": list(cfg.model.kv_source),
  }
  mlog.log_progress(f"{name}: {row}")
  return row


def run(config: ClaConfig, workdir: str) -> dict:
  table = variant_overrides(config.model)
  names = config.variants or tuple(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ConfigError(f"unknown variants {unknown}; valid: {', '.join(table)}")
  configs = {name: dataclasses.replace(config, model=variant_model(config.model, table[name]))
             for name in names}
  for cfg in configs.values():  # refuse a bad config before any training
    cfg.validate()
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="cla"))
  rows = run_variants(workdir, names,
                      lambda name: variant_key(configs[name], ignore=("variants",)),
                      lambda name, directory: _train_variant(configs[name], name, directory))
  summary = {"exp": "cla", "steps": config.train.steps, "variants": rows,
             "budget_bytes": config.budget_bytes, "context_len": config.context_len,
             "wall_s": time.time() - t_start, "config": flatten(config)}
  mlog.log_progress(format_table(rows))
  plot = _plot(rows, os.path.join(workdir, "cla.png"))
  if plot:
    summary["figures"] = [os.path.basename(plot)]
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def format_table(rows: list[dict]) -> str:
  head = f"{'variant':<10} {'params':>9} {'KV B/tok':>9} {'val loss':>9} {'dec tok/s':>10} " \
         f"{'max batch':>9}"
  lines = [head] + [
      f"{r['name']:<10} {r['params']:>9,} {r['kv_bytes_per_token']:>9,} {r['val_loss']:>9.4f} "
      f"{r['decode_tokens_per_s']:>10.0f} {r['max_batch_at_context']:>9,}" for r in rows]
  return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> str | None:
  try:
    from jaxtricks.plotting import plot_labeled_points  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return None
  return plot_labeled_points([(r["name"], r["kv_bytes_per_token"], r["val_loss"]) for r in rows],
                             path, "KV-cache bytes per token", "held-out loss (nats per byte)",
                             log2_x=True)

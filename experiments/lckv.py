"""Condensed KV caches: MQA, MQA-CLA2, Layer-Condensed KV (Wu & Tu 2024, arXiv 2405.10637) and a
YOCO-like layout (Sun et al. 2024, arXiv 2405.05254); then HyperAttention (Han et al. 2023, arXiv
2310.05869) patched into the trained MQA model.

    python launch.py --exp=lckv                  # default preset, a few minutes on 2 CPU cores
    python launch.py --exp=lckv --preset=smoke

Every layout trains with equal steps and tokens on the embedded corpus (MQA heads, same depth and
width). Per layout: held-out loss, KV bytes per token, the cache of one `context_len`-token
sequence (from the allocated arrays) and greedy decode tokens/s. For LCKV (trained and evaluated
by m parallel iterations) also the held-out loss of the exact sequential computation (one token
at a time through the cache) and the gap between the two. Then the trained MQA model's held-out
loss with its last l layers running HyperAttention, for each l in `patch_layers` (the paper's
patching of ChatGLM2, at our scale).

summary.json: `variants` = [{name, params, kv_source, window_layers, kv_bytes_per_token,
cache_bytes_per_sequence, val_loss, decode_tokens_per_s, and for LCKV val_loss_iterative,
val_loss_exact, exact_gap}], `patching` = [{layers, val_loss}]; figures lckv.png (val loss
against allocated cache bytes per token at `context_len`) and lckv_patching.png.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

from experiments.measure import decode_speed, eval_batches, held_out_loss
from experiments.variants import run_variants, variant_key
from jaxtricks import metrics as mlog
from jaxtricks.config import Config, flatten, to_dict
from jaxtricks.decode import cache_bytes, init_cache, teacher_forced_logits
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.lckv import LCKVAttention
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops.attention import kv_bytes_per_token
from jaxtricks.ops.kv_layout import cycle
from jaxtricks.ops.losses import cross_entropy
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.loop import train

PRESETS = ("smoke", "default")
VARIANTS = ("MQA", "MQA-CLA2", "LCKV", "YOCO-like")


def variant_attention(base: AttentionConfig, name: str, depth: int, window: int) -> Any:
  """The attention component of each layout, MQA heads throughout."""
  mqa = dataclasses.replace(base, n_kv_heads=1)
  if name == "MQA":
    return mqa
  if name == "MQA-CLA2":
    return dataclasses.replace(mqa, kv_sharing=2)
  if name == "LCKV":
    fields = {f.name: getattr(mqa, f.name) for f in dataclasses.fields(AttentionConfig)}
    return LCKVAttention(**fields)  # the paper's two warm-up layers, m = 7, b = 2
  half = depth // 2  # YOCO-like: a windowed lower half, the upper half reading one global K/V
  return dataclasses.replace(mqa, kv_layout=tuple(range(half)) + (half,) * (depth - half),
                             window=window, window_layers=tuple(range(half)))


@dataclasses.dataclass(frozen=True)
class LCKVConfig(Config):
  variants: tuple[str, ...] = ()       # empty: all four
  window: int = 32                     # YOCO-like: the lower half's sliding window
  context_len: int = 2048              # cache_bytes_per_sequence at this length
  decode_batch: int = 8
  decode_prompt_len: int = 32
  decode_new_tokens: int = 64
  patch_layers: tuple[int, ...] = (0, 2, 4, 8)  # HyperAttention in the last l layers
  patch_len: int = 0                   # the patching's context (0: train.seq_len)
  hyper_block: int = 16
  hyper_samples: int = 16
  hyper_min_len: int = 32


def get_config(preset: str) -> LCKVConfig:
  if preset == "smoke":
    return LCKVConfig(
        model=ModelConfig(d_model=32, n_layers=4, attention=AttentionConfig(n_heads=4)),
        train=TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, log_every=3,
                          ckpt_every=0, eval_batches=1),
        window=8, context_len=256, decode_batch=2, decode_prompt_len=8, decode_new_tokens=8,
        patch_layers=(0, 2, 4), hyper_block=4, hyper_samples=4, hyper_min_len=8)
  return LCKVConfig(
      model=ModelConfig(d_model=128, n_layers=8, attention=AttentionConfig(n_heads=4)),
      train=TrainConfig(steps=150, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=15,
                        log_every=25, ckpt_every=0, eval_batches=8))


def _model(config: LCKVConfig, name: str) -> ModelConfig:
  m = config.model
  return dataclasses.replace(m, attention=variant_attention(m.attention, name, m.depth,
                                                             config.window))


def _val_loss(config: LCKVConfig, model: ModelConfig, params, seq_len: int) -> float:
  """Held-out loss of `params` under `model` (which may differ from the trained one in its
  attention implementation) at `seq_len`."""
  return held_out_loss(dataclasses.replace(
      config, model=model, train=dataclasses.replace(config.train, seq_len=seq_len)), params)


def _exact_val_loss(config: LCKVConfig, model: ModelConfig, params) -> float:
  """Held-out loss of the exact sequential computation: one token at a time through the cache."""
  transformer, total, count = Transformer(model), 0.0, 0.0
  tc = config.train
  for batch in eval_batches(config.data, tc.seq_len, tc.batch_size, tc.eval_batches):
    logits = teacher_forced_logits(transformer, params, batch["inputs"])
    t, c = cross_entropy(logits, batch["targets"])
    total, count = total + float(t), count + float(c)
  return total / count


def _train_variant(config: LCKVConfig, name: str, directory: str) -> dict:
  model = _model(config, name)
  cfg = dataclasses.replace(config, model=model)
  result = train(cfg, directory, exp=f"lckv/{name}")
  plan = model.kv_plan
  row = {
      "name": name,
      "params": result.summary["params"],
      "kv_source": list(model.kv_source),
      "window_layers": [s.layer for s in plan if s.window],
      "kv_bytes_per_token": kv_bytes_per_token(model),
      "cache_bytes_per_sequence": cache_bytes(init_cache(model, 1, config.context_len)),
      "val_loss": result.summary["val_loss"],
      "decode_tokens_per_s": decode_speed(result, config.decode_batch, config.decode_prompt_len,
                                          config.decode_new_tokens),
  }
  if cycle(plan):
    params = jax.device_get(result.state.params)
    iterative = _val_loss(config, model, params, config.train.seq_len)
    exact = _exact_val_loss(config, model, params)
    row.update(val_loss_iterative=iterative, val_loss_exact=exact,
               exact_gap=(iterative - exact) / exact)
  if name == "MQA":
    row["patching"] = _patching(config, model, jax.device_get(result.state.params))
  mlog.log_progress(f"{name}: {row}")
  return row


def _patching(config: LCKVConfig, model: ModelConfig, params) -> list[dict]:
  seq_len = config.patch_len or config.train.seq_len
  out = []
  for n in config.patch_layers:
    patched = dataclasses.replace(model, attention=dataclasses.replace(
        model.attention, hyper_layers=tuple(range(model.depth - n, model.depth)),
        hyper_block=config.hyper_block, hyper_samples=config.hyper_samples,
        hyper_min_len=config.hyper_min_len))
    out.append({"layers": n, "val_loss": _val_loss(config, patched, params, seq_len)})
    mlog.log_progress(f"MQA with HyperAttention in the last {n} layers: {out[-1]['val_loss']:.4f}")
  return out


def _check(config: LCKVConfig, names: tuple[str, ...]) -> None:
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ConfigError(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
  for name in names:
    dataclasses.replace(config, model=_model(config, name)).validate()
  depth = config.model.depth
  bad = [n for n in config.patch_layers if not 0 <= n <= depth]
  if bad:
    raise ConfigError(f"patch_layers {bad} must be in [0, {depth}] (the model's layers)")
  seq_len = config.patch_len or config.train.seq_len
  if seq_len > config.hyper_block and seq_len % config.hyper_block:
    raise ConfigError(f"hyper_block={config.hyper_block} does not divide the patching context "
                      f"{seq_len} (patch_len, else train.seq_len)")


def run(config: LCKVConfig, workdir: str) -> dict:
  names = config.variants or VARIANTS
  _check(config, names)
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="lckv"))
  rows = run_variants(workdir, names,
                      lambda name: variant_key(dataclasses.replace(config, model=_model(config,
                                                                                         name)),
                                               ignore=("variants",)),
                      lambda name, directory: _train_variant(config, name, directory))
  patching = next((r.pop("patching") for r in rows if "patching" in r), [])
  summary = {"exp": "lckv", "steps": config.train.steps, "variants": rows, "patching": patching,
             "context_len": config.context_len, "wall_s": time.time() - t_start,
             "config": flatten(config)}
  mlog.log_progress(format_table(rows, patching))
  figures = [f for f in (_plot(rows, config, workdir), _plot_patching(patching, workdir)) if f]
  if figures:
    summary["figures"] = [os.path.basename(f) for f in figures]
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def format_table(rows: list[dict], patching: list[dict]) -> str:
  lines = [f"{'layout':<10} {'params':>9} {'KV B/tok':>9} {'cache/seq':>11} {'val loss':>9} "
           f"{'exact':>8} {'gap':>7} {'dec tok/s':>10}"]
  for r in rows:
    exact = f"{r['val_loss_exact']:>8.4f} {100 * r['exact_gap']:>6.2f}%" if "exact_gap" in r \
        else f"{'':>8} {'':>7}"
    lines.append(f"{r['name']:<10} {r['params']:>9,} {r['kv_bytes_per_token']:>9,} "
                 f"{r['cache_bytes_per_sequence']:>11,} {r['val_loss']:>9.4f} {exact} "
                 f"{r['decode_tokens_per_s']:>10.0f}")
  if patching:
    lines.append("HyperAttention layers: " + ", ".join(
        f"{p['layers']}: {p['val_loss']:.4f}" for p in patching))
  return "\n".join(lines)


def _plot(rows: list[dict], config: LCKVConfig, workdir: str) -> str | None:
  points = [(r["name"], r["cache_bytes_per_sequence"] / config.context_len, r["val_loss"])
            for r in rows]
  return _scatter(points, os.path.join(workdir, "lckv.png"),
                  f"allocated KV-cache bytes per token at {config.context_len} tokens",
                  log2_x=True)


def _plot_patching(patching: list[dict], workdir: str) -> str | None:
  if not patching:
    return None
  return _scatter([(str(p["layers"]), p["layers"], p["val_loss"]) for p in patching],
                  os.path.join(workdir, "lckv_patching.png"),
                  "layers running HyperAttention (the last l)")


def _scatter(points: list, path: str, xlabel: str, log2_x: bool = False) -> str | None:
  try:
    from jaxtricks.plotting import plot_labeled_points  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return None
  return plot_labeled_points(points, path, xlabel, "held-out loss (nats per byte)", log2_x=log2_x)

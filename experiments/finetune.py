"""Fine-tuning a pretrained LM: full fine-tuning, LoRA (arXiv 2106.09685), MoRA (arXiv
2405.12130), SPAFIT (arXiv 2405.00201) and, on a SLoPe-sparse model, SPP (arXiv 2405.16057),
each optionally with NEFTune (arXiv 2310.05914), with equal steps and tokens on two tasks.

    python launch.py --exp=finetune                 # default preset: under 5 minutes, 2 CPU cores
    python launch.py --exp=finetune --preset=smoke
    python launch.py --exp=finetune --preset=slope  # SLoPe 2:4 pretraining: SPP, LoRA, masked full
    python launch.py --exp=finetune --init_from=runs/lm  # fine-tune that run's model instead

First pretrains a small LM on the standard library without its tests (`pretrain/`; skipped with
--init_from, whose model is then used), then fine-tunes it with every method of `methods`
(`NAME+neftune` adds NEFTune's noise, alpha `neftune_alpha`) on each task of `tasks`:
- `domain`: domain adaptation to the standard library's `test_*.py` files (both corpora split
  into train / held-out by the same path hash); reports the fine-tuned held-out loss and the
  forgetting: the pretraining domain's held-out loss after fine-tuning minus before.
- `memorise`: MoRA's memorisation task: `uuid_pairs` random hex key -> value pairs
  (jaxtricks.data.uuid_pairs), exact match of the whole value given the key (teacher-forced
  argmax, equal to greedy decoding's) against steps.
Full fine-tuning trains at `finetune.lr`, the adapter methods at `adapter_lr` (adapters take
larger learning rates; equal steps and tokens for all). LoRA, MoRA and SPAFIT have the same
rank `rank` (MoRA's square side r^ matches LoRA's trainable count at that rank); SPP has
`spp_rank` row groups. The base weights of every adapter are frozen
and held apart from the optimizer: `train_state_bytes` counts the trained parameters and their
optimizer state, `frozen_bytes` the frozen weights beside them. Every adapted model is merged
into plain weights and its logits compared with the adapted model's, with float64 parameters
and matmuls (the merge itself: `merged_max_abs_diff`, `merged_equal` within 1e-5; norms and
softmax stay float32, as in every jaxtricks model, so a difference below float32 resolution
there reads 0) and in float32
(`merged_max_abs_diff_float32`, beside `float32_error`: the adapted model's own float32
round-off against float64); `merged_density` is the non-zero fraction of the merged projection
kernels (on the sparse preset SPP keeps 0.5 at 2:4, LoRA's dense update does not).

summary.json: `pretrained` (its held-out losses on both domains), `rows` = [{task, method,
trainable_params, train_state_bytes, optimizer_state_bytes, frozen_bytes, val_loss, forgetting
(domain), exact_match, char_accuracy and exact_match_curve (memorise), merged_equal,
merged_max_abs_diff, merged_max_abs_diff_float32, float32_error, max_abs_logit, merged_density,
wall_s}], `train_state_ratio_lora_to_full`;
memorisation.png (exact match against steps per method). One seed: differences within a few
hundredths of a nat are noise at this scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from flax import traverse_util

from experiments.measure import eval_batches, held_out_loss
from experiments.variants import run_variants, variant_key
from jaxtricks import metrics as mlog
from jaxtricks.config import Config, flatten, to_dict
from jaxtricks.data.corpus import DataConfig
from jaxtricks.data.sources import make_source
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.lora import LoRAProjection
from jaxtricks.layers.mora import MoRAProjection
from jaxtricks.layers.neftune import NEFTuneEmbedConfig
from jaxtricks.layers.nm_projection import SlopeProjection
from jaxtricks.layers.spafit import SPAFITProjection
from jaxtricks.layers.spp import SPPProjection
from jaxtricks.models.merge import merged_params
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train import init_from
from jaxtricks.train.build import build
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.loop import train
from jaxtricks.train.state import FrozenBaseState

PRESETS = ("smoke", "default", "slope", "full")
METHODS = ("full", "lora", "mora", "spafit", "spp")
TASKS = ("domain", "memorise")
TESTS = "test_*.py"
MERGE_TOLERANCE = 1e-5  # on the logits, float64 parameters and matmuls


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(Config):
  """`model`, `train`, `data`: the pretraining run; `finetune`: every fine-tuning run's
  schedule (its loss, data and init_from are set per task)."""
  data: DataConfig = DataConfig(exclude=TESTS)
  finetune: TrainConfig = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, ckpt_every=0)
  methods: tuple[str, ...] = ("full", "lora", "mora", "spafit", "full+neftune")
  tasks: tuple[str, ...] = TASKS
  rank: int = 8                   # LoRA, MoRA (as LoRA's count), SPAFIT
  lora_alpha: float = 16.0
  spp_rank: int = 16
  spafit_groups: tuple[int, ...] = ()   # (frozen, bias-only, LoRA) blocks; () = thirds
  adapter_lr: float = 5e-3        # peak learning rate of the adapter methods (full: finetune.lr)
  neftune_alpha: float = 5.0
  uuid_pairs: int = 64
  memorise_eval_every: int = 20

  def validate(self) -> FinetuneConfig:
    super().validate()
    bad = [m for m in self.methods if _split(m)[0] not in METHODS or _split(m)[1] not in
           ("", "neftune")]
    if bad or not self.methods:
      raise ConfigError(f"methods={self.methods}: unknown {bad}; valid: {', '.join(METHODS)}, "
                        "each optionally NAME+neftune")
    if set(self.tasks) - set(TASKS) or not self.tasks:
      raise ConfigError(f"tasks={self.tasks} must be a non-empty subset of {', '.join(TASKS)}")
    if self.memorise_eval_every < 1 or self.uuid_pairs < 1 or self.adapter_lr <= 0:
      raise ConfigError("memorise_eval_every and uuid_pairs must be >= 1 and adapter_lr > 0")
    return self


def _split(method: str) -> tuple[str, str]:
  name, _, option = method.partition("+")
  return name, option


def method_model(config: FinetuneConfig, base: ModelConfig, method: str) -> ModelConfig:
  """The fine-tuning model of `method` on the pretrained `base`."""
  name, option = _split(method)
  kind = base.projection.kind
  if name == "spp" and kind not in ("slope", "srste"):
    raise ConfigError(f"method spp needs an N:M sparse pretrained model (model.projection=slope "
                      f"or srste), not {kind!r}; use --preset=slope")
  projection = {
      "full": base.projection,
      "lora": LoRAProjection(rank=config.rank, alpha=config.lora_alpha),
      "mora": MoRAProjection(rank=config.rank),
      "spafit": SPAFITProjection(groups=config.spafit_groups, rank=config.rank,
                                 alpha=config.lora_alpha),
      "spp": SPPProjection(rank=config.spp_rank, n=getattr(base.projection, "n", 2),
                           m=getattr(base.projection, "m", 4)),
  }[name]
  embed = NEFTuneEmbedConfig(neftune_alpha=config.neftune_alpha) if option else base.embed
  return dataclasses.replace(base, projection=projection, embed=embed)


def task_data(config: FinetuneConfig, task: str) -> DataConfig:
  if task == "domain":
    return dataclasses.replace(config.data, include=TESTS, exclude="")
  return DataConfig(task="uuid", task_pairs=config.uuid_pairs)


def task_config(config: FinetuneConfig, base: ModelConfig, source: str, task: str,
                method: str) -> Config:
  lr = config.finetune.lr if _split(method)[0] == "full" else config.adapter_lr
  ft = dataclasses.replace(config.finetune, init_from=source, seq_len=config.train.seq_len, lr=lr)
  if task == "memorise":
    task_source = make_source(task_data(config, task), ft.seq_len)
    ft = dataclasses.replace(ft, loss="lm_exact", eval_every=config.memorise_eval_every,
                             eval_batches=task_source.eval_batches_needed(ft.seq_len,
                                                                          ft.batch_size))
  return Config(model=method_model(config, base, method), train=ft,
                data=task_data(config, task), mesh=config.mesh)


def get_config(preset: str) -> FinetuneConfig:
  if preset == "smoke":
    return FinetuneConfig(
        model=ModelConfig(d_model=32, n_layers=3, attention=AttentionConfig(n_heads=2)),
        train=TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, log_every=3,
                          ckpt_every=0, eval_batches=1),
        data=DataConfig(exclude=TESTS, max_bytes=200_000),
        finetune=TrainConfig(steps=4, batch_size=4, warmup_steps=1, log_every=2, ckpt_every=0,
                             eval_batches=1, lr=1e-3),
        rank=2, spp_rank=4, uuid_pairs=16, memorise_eval_every=2)
  model = ModelConfig(d_model=128, n_layers=4, attention=AttentionConfig(n_heads=4))
  pretrain = TrainConfig(steps=250, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=25,
                         log_every=50, ckpt_every=0, eval_batches=8)
  finetune = TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10, log_every=25,
                         ckpt_every=0, eval_batches=8)
  if preset == "default":
    return FinetuneConfig(model=model, train=pretrain, finetune=finetune)
  if preset == "slope":
    return FinetuneConfig(model=dataclasses.replace(model, projection=SlopeProjection()),
                          train=pretrain, finetune=finetune, methods=("full", "lora", "spp"))
  return FinetuneConfig(
      model=ModelConfig(d_model=768, n_layers=12, attention=AttentionConfig(n_heads=12)),
      train=TrainConfig(steps=20_000, batch_size=64, seq_len=1024, lr=1e-3, warmup_steps=1000,
                        log_every=100, ckpt_every=2000, eval_batches=32),
      finetune=TrainConfig(steps=2000, batch_size=64, lr=3e-4, warmup_steps=100, log_every=100,
                           ckpt_every=500, eval_batches=32),
      rank=16, uuid_pairs=10_000, memorise_eval_every=200)


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))




def _logits(model: ModelConfig, params, tokens: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, dict]:
  """(the adapted model's logits, the merged model's, the merged parameters), in the model's
  dtype (the final hidden state times the unembedding: `Transformer.logits` would round them to
  float32)."""
  merged_model, merged = merged_params(model, params)

  def logits(config, p):
    hidden = Transformer(config).apply({"params": p}, tokens, method="hidden")
    return np.asarray(hidden @ config.head.unembedding(p["head"]))

  return logits(model, params), logits(merged_model, merged), merged


def merge_check(model: ModelConfig, params, tokens: np.ndarray) -> dict:
  """The merged model's logits against the adapted model's: with float64 parameters and matmuls
  (the merge itself, `merged_max_abs_diff`, which `merged_equal` holds to MERGE_TOLERANCE; the
  norms and softmax compute in float32 as always) and in float32 (what a float32 user sees,
  beside `float32_error`, the adapted model's own float32 round-off against float64); and the
  merged projection kernels' density."""
  params = jax.device_get(params)
  adapted32, merged32, merged = _logits(model, params, tokens)
  with jax.enable_x64(True):
    model64 = dataclasses.replace(model, dtype="float64", param_dtype="float64")
    adapted64, merged64, _ = _logits(model64, jax.tree.map(
        lambda x: np.asarray(x, np.float64), params), tokens)
  diff = float(np.max(np.abs(adapted64 - merged64)))
  kernels = [np.asarray(v) for p, v in traverse_util.flatten_dict(merged).items()
             if p[0].startswith("block_") and p[-1] == "kernel" and p[-2] in
             ("q", "k", "v", "o", "gate", "up", "down")]
  density = sum(int(np.count_nonzero(k)) for k in kernels) / sum(k.size for k in kernels)
  return {"merged_max_abs_diff": diff, "merged_equal": diff <= MERGE_TOLERANCE,
          "merged_max_abs_diff_float32": float(np.max(np.abs(adapted32 - merged32))),
          "float32_error": float(np.max(np.abs(adapted32 - adapted64))),
          "max_abs_logit": float(np.max(np.abs(adapted64))), "merged_density": density}


def _curve(metrics_path: str, key: str) -> list[list[float]]:
  """[[step, value], ...] of `key` in a metrics.jsonl."""
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f]
  return [[r["step"], r[key]] for r in records if key in r]


def _finetune(config: FinetuneConfig, base: ModelConfig, source: str, task: str, method: str,
              directory: str, pretrained: dict) -> dict:
  cfg = task_config(config, base, source, task, method)
  result = train(cfg, directory, exp=f"finetune/{task}/{method}")
  state = result.state
  frozen = state.frozen if isinstance(state, FrozenBaseState) else {}
  params = state.model_params()
  batch = eval_batches(cfg.data, cfg.train.seq_len, cfg.train.batch_size, 1)[0]
  row = {
      "task": task, "method": method,
      "params": result.summary["params"],
      "trainable_params": result.summary["trainable_params"],
      "train_state_bytes": _bytes(state.params) + _bytes(state.opt_state),
      "optimizer_state_bytes": _bytes(state.opt_state),
      "frozen_bytes": _bytes(frozen),
      "val_loss": result.summary["val_loss"],
      **merge_check(cfg.model, params, np.asarray(batch["inputs"][:4])),
  }
  if task == "domain":
    after = held_out_loss(cfg, params, config.data)
    row.update(pretrain_val_loss_after=after,
               forgetting=after - pretrained["pretrain_domain_val_loss"])
  else:
    row["exact_match"] = result.summary["val_metrics"]["exact_match"]
    row["char_accuracy"] = result.summary["val_metrics"]["accuracy"]
    row["exact_match_curve"] = _curve(os.path.join(directory, "metrics.jsonl"),
                                      "val_exact_match")
  mlog.log_progress(f"{task}/{method}: " + ", ".join(
      f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
      if not isinstance(v, list)))
  return row


def base_model(model: ModelConfig) -> ModelConfig:
  """The pretrained model that `model` (a pretraining or fine-tuning run's) adapts: components
  at their bases, but an N:M sparse projection kept (SPP and masked full fine-tuning need it)."""
  sparse = model.projection.kind in ("slope", "srste")
  base = init_from.base_config(model)
  return dataclasses.replace(base, projection=model.projection) if sparse else base


def _pretrain(config: FinetuneConfig, workdir: str) -> tuple[ModelConfig, str, dict]:
  """(the base model, its workdir, its held-out losses on both domains)."""
  if config.train.init_from:
    source = init_from.read_source(config.train.init_from)
    base, directory = base_model(source.model), source.directory
    built = build(Config(model=source.model, train=dataclasses.replace(
        config.train, init_from=""), data=config.data, mesh=config.mesh))
    state = built.init_state(loaded=init_from.load(source, built))
    params = state.model_params()
    cfg = built.config
    pre = held_out_loss(cfg, params, config.data)
  else:
    directory = os.path.join(workdir, "pretrain")
    cfg = Config(model=config.model, train=config.train, data=config.data, mesh=config.mesh)
    result = train(cfg, directory, exp="finetune/pretrain")
    base, params, pre = config.model, result.state.model_params(), result.summary["val_loss"]
  losses = {"pretrain_domain_val_loss": pre}
  if "domain" in config.tasks:
    losses["finetune_domain_val_loss"] = held_out_loss(cfg, params, task_data(config, "domain"))
  return base, directory, losses


def run(config: FinetuneConfig, workdir: str) -> dict:
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="finetune"))
  base_for_check = config.model
  if config.train.init_from:
    base_for_check = base_model(init_from.read_source(config.train.init_from).model)
  for task in config.tasks:  # refuse a bad config before any training
    for method in config.methods:
      dataclasses.replace(task_config(config, base_for_check, "pretrain", task, method),
                          train=dataclasses.replace(config.finetune, init_from="")).validate()
  base, source, pretrained = _pretrain(config, workdir)
  names = [f"{task}/{method}" for task in config.tasks for method in config.methods]
  rows = run_variants(
      workdir, names,
      lambda name: variant_key(task_config(config, base, source, *name.split("/"))),
      lambda name, directory: _finetune(config, base, source, *name.split("/"), directory,
                                        pretrained))
  summary = {
      "exp": "finetune", "pretrained": {**pretrained, "workdir": source},
      "rows": rows, "wall_s": time.time() - t_start, "config": flatten(config),
  }
  by = {(r["task"], r["method"]): r for r in rows}
  for task in config.tasks:
    if (task, "lora") in by and (task, "full") in by:
      summary["train_state_ratio_lora_to_full"] = (by[task, "lora"]["train_state_bytes"]
                                                   / by[task, "full"]["train_state_bytes"])
  mlog.log_progress(format_table(rows))
  plot = _plot([r for r in rows if r["task"] == "memorise"],
               os.path.join(workdir, "memorisation.png"))
  if plot:
    summary["figures"] = [os.path.basename(plot)]
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def format_table(rows: list[dict]) -> str:
  head = (f"{'task':<9} {'method':<13} {'trained':>9} {'state B':>10} {'val loss':>9} "
          f"{'forget':>7} {'exact':>6} {'merge f64':>9} {'merge f32':>9} {'density':>7}")
  lines = [head]
  for r in rows:
    forget = f"{r['forgetting']:>7.3f}" if "forgetting" in r else f"{'':>7}"
    exact = f"{r['exact_match']:>6.3f}" if "exact_match" in r else f"{'':>6}"
    lines.append(f"{r['task']:<9} {r['method']:<13} {r['trainable_params']:>9,} "
                 f"{r['train_state_bytes']:>10,} {r['val_loss']:>9.4f} {forget} {exact} "
                 f"{r['merged_max_abs_diff']:>9.1e} {r['merged_max_abs_diff_float32']:>9.1e} "
                 f"{r['merged_density']:>7.3f}")
  return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> str | None:
  if not rows:
    return None
  try:
    from jaxtricks.plotting import plot_loglog  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return None
  series = {r["method"]: ([s for s, _ in r["exact_match_curve"]],
                          [v for _, v in r["exact_match_curve"]], "o-") for r in rows}
  return plot_loglog(series, path, "fine-tuning step", "exact match of the value", log=False)

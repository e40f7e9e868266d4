"""How linear is each block of a small LM ("Your Transformer is Secretly Linear", Razzhigaev et
al. 2024, arXiv 2405.12250; jaxtricks.analysis.linearity and jaxtricks.train.cosine_reg).

    python launch.py --exp=linearity                       # default preset, a few minutes on CPU
    python launch.py --exp=linearity --preset=smoke
    python launch.py --exp=linearity --init_from=runs/lm   # analyse a trained LM instead

Pretrains the `--exp=lm` default model (or reads `--init_from`, any jaxtricks LM workdir), then on
`calib_batches` batches of the training split (fixed windows) computes every block's linearity
score with and without the residual, fits an affine map per block, and evaluates the held-out loss
(val_loss's batches) with the k most linear blocks replaced, k in `ks` (empty: 0..L-1; k = 0 is
val_loss). Then trains the same model with the cosine regulariser (`reg_weight`, `reg_mode`) for
the same steps and scores it the same way. With `--init_from` the regularised model is trained with
the recipe that workdir records (its train section), or not at all when it records none.

summary.json: `base` and `cosine` = {val_loss, layers [{layer, with_residual,
without_residual}], mean_with_residual, mean_without_residual, replacement [{k, replaced,
loss}], score_s (seconds to score every block, compile included)}, `calib_tokens`; figures
linearity.png (scores per layer) and replacement.png (loss against k).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from experiments import lm
from experiments.measure import eval_batches
from experiments.variants import run_variants, variant_key
from jaxtricks import metrics as mlog
from jaxtricks.analysis.linearity import (
  layer_scores,
  load_lm,
  recorded_config,
  replacement_curve,
)
from jaxtricks.config import Config, flatten, override, to_dict
from jaxtricks.data import batching
from jaxtricks.data.sources import make_source
from jaxtricks.errors import ConfigError
from jaxtricks.models.transformer import ModelConfig
from jaxtricks.train import init_from
from jaxtricks.train.loop import train

PRESETS = ("smoke", "default")
VARIANTS = ("base", "cosine")


@dataclasses.dataclass(frozen=True)
class LinearityConfig(Config):
  calib_batches: int = 4        # held-out batches the scores and the affine fits use
  ks: tuple[int, ...] = ()      # numbers of replaced blocks (empty: 0..L-1)
  reg_weight: float = 0.1       # the regularised model's model.regulariser.weight
  reg_mode: str = "pull"        # and its mode (jaxtricks.train.cosine_reg)

  def validate(self) -> LinearityConfig:
    super().validate()
    if self.calib_batches < 1:
      raise ConfigError(f"calib_batches must be >= 1, got {self.calib_batches}")
    return self


def get_config(preset: str) -> LinearityConfig:
  base = lm.get_config("default" if preset == "default" else "smoke")
  train = base.train if preset == "default" else dataclasses.replace(base.train, ckpt_every=0)
  return LinearityConfig(model=base.model, train=train,
                         calib_batches=4 if preset == "default" else 2)


def regularised(config: LinearityConfig, model: ModelConfig) -> ModelConfig:
  return override(model, {"regulariser": "cosine", "regulariser.weight": config.reg_weight,
                          "regulariser.mode": config.reg_mode})


def check_analysis(config: LinearityConfig, model: ModelConfig, batch_size: int,
                   seq_len: int) -> None:
  """One-line errors before any training: replaced-block counts within the depth, and enough
  calibration tokens for a determined least-squares fit."""
  bad = [k for k in config.ks if not 0 <= k < model.depth]
  if bad:
    raise ConfigError(f"ks {bad}: cannot replace that many of the model's {model.depth} blocks "
                      f"(k must be in [0, {model.depth - 1}])")
  tokens = config.calib_batches * batch_size * seq_len
  if tokens <= model.d_model + 1:
    raise ConfigError(f"calib_batches={config.calib_batches} gives {tokens} calibration tokens, "
                      f"not more than d_model + 1 = {model.d_model + 1}: the least-squares fit "
                      f"is underdetermined (every score would be 1); give more batches")


def calibration_tokens(data, seq_len: int, batch_size: int, n_batches: int) -> np.ndarray:
  """(n_batches * batch_size, seq_len) fixed windows evenly spaced over the training split (a
  synthetic task: its held-out batches after the evaluation ones)."""
  source = make_source(data, seq_len)
  corpus = getattr(source, "corpus", None)
  if corpus is None:
    batches = source.eval_batches(seq_len, batch_size, 2 * n_batches)[n_batches:]
  else:
    batches = batching.eval_batches(corpus.train, seq_len, batch_size, n_batches)
  return np.concatenate([b["inputs"] for b in batches])


def analyse(config: LinearityConfig, data, train_config, model, params) -> dict:
  """Scores, their means and the replacement curve of one trained model: calibrated on the
  training split, evaluated on val_loss's held-out batches."""
  tc = train_config
  held_out = eval_batches(data, tc.seq_len, tc.batch_size, tc.eval_batches)
  calib = calibration_tokens(data, tc.seq_len, tc.batch_size, config.calib_batches)
  t0 = time.perf_counter()
  layers = layer_scores(model, params, calib)
  score_s = time.perf_counter() - t0
  curve = replacement_curve(model, params, calib, held_out, ks=config.ks or None)
  return {"layers": layers, "score_s": score_s, "calib_tokens": int(calib.size),
          "mean_with_residual": float(np.mean([s["with_residual"] for s in layers])),
          "mean_without_residual": float(np.mean([s["without_residual"] for s in layers])),
          "replacement": curve}


def run(config: LinearityConfig, workdir: str) -> dict:
  config.validate()
  t_start = time.time()
  loaded = recipe = None
  if config.train.init_from:
    source = init_from.read_source(config.train.init_from)  # one-line error: not an LM workdir
    loaded = load_lm(source.directory)[:2]
    recorded = recorded_config(source.directory)
    if recorded is not None:
      recipe = dataclasses.replace(recorded, model=loaded[0].config, mesh=config.mesh)
  else:
    recipe = Config(model=config.model, train=config.train, data=config.data, mesh=config.mesh)
  model_cfg = config.model if loaded is None else loaded[0].config
  tc = config.train if recipe is None else recipe.train
  data = config.data if recipe is None else recipe.data
  check_analysis(config, model_cfg, tc.batch_size, tc.seq_len)
  regularised(config, model_cfg).validate()
  os.makedirs(workdir, exist_ok=True)
  mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="linearity"))

  def run_one(name: str, directory: str) -> dict:
    if name == "base" and loaded is not None:
      row = {"name": name, "init_from": config.train.init_from, "val_loss": None}
      row.update(analyse(config, data, tc, *loaded))
      return row
    cfg = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, init_from=""))
    if name == "cosine":
      cfg = dataclasses.replace(cfg, model=regularised(config, cfg.model))
    result = train(cfg, directory, exp=f"linearity/{name}")
    row = {"name": name, "val_loss": result.summary["val_loss"]}
    row.update(analyse(config, data, cfg.train, result.model, result.state.model_params()))
    mlog.log_progress(f"{name}: val loss {row['val_loss']:.4f}, mean linearity "
                      f"{row['mean_with_residual']:.4f} with the residual, "
                      f"{row['mean_without_residual']:.4f} without")
    return row

  names = VARIANTS if recipe is not None else ("base",)
  rows = run_variants(workdir, names, lambda name: variant_key(config), run_one)
  summary = {"exp": "linearity", "steps": tc.steps, "cosine": None,
             **{r["name"]: r for r in rows}, "calib_tokens": rows[0]["calib_tokens"],
             "wall_s": time.time() - t_start, "config": flatten(config)}
  if recipe is None:
    mlog.log_progress(f"{config.train.init_from} records no training recipe: the regularised "
                      f"model is not trained")
  mlog.log_progress(format_table(rows))
  figures = [f for f in _plot(rows, workdir) if f]
  if figures:
    summary["figures"] = [os.path.basename(f) for f in figures]
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def format_table(rows: list[dict]) -> str:
  lines = []
  for r in rows:
    val = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
    lines.append(f"{r['name']}: val loss {val}; scores on {r['calib_tokens']} tokens in "
                 f"{r['score_s']:.1f} s")
    lines.append(f"  {'layer':>5} {'with residual':>14} {'without':>9}")
    lines += [f"  {s['layer']:>5} {s['with_residual']:>14.4f} {s['without_residual']:>9.4f}"
              for s in r["layers"]]
    lines.append(f"  {'mean':>5} {r['mean_with_residual']:>14.4f} "
                 f"{r['mean_without_residual']:>9.4f}")
    lines.append(f"  {'k':>5} {'replaced':>14} {'val loss':>9}")
    lines += [f"  {c['k']:>5} {','.join(map(str, c['replaced'])) or '-':>14} {c['loss']:>9.4f}"
              for c in r["replacement"]]
  return "\n".join(lines)


def _plot(rows: list[dict], workdir: str) -> list[str | None]:
  try:
    from jaxtricks.plotting import plot_loglog  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return []
  scores, curves = {}, {}
  for r, color in zip(rows, "bg", strict=False):
    layers = [s["layer"] for s in r["layers"]]
    scores[f"{r['name']} with residual"] = (layers, [s["with_residual"] for s in r["layers"]],
                                            f"{color}o-")
    scores[f"{r['name']} without"] = (layers, [s["without_residual"] for s in r["layers"]],
                                      f"{color}s--")
    curves[r["name"]] = ([c["k"] for c in r["replacement"]],
                         [c["loss"] for c in r["replacement"]], f"{color}o-")
  return [plot_loglog(scores, os.path.join(workdir, "linearity.png"), "block",
                      "linearity score", log=False),
          plot_loglog(curves, os.path.join(workdir, "replacement.png"),
                      "most linear blocks replaced by affine maps", "held-out loss", log=False)]

"""KAN grid extension (Liu et al. 2024, arXiv 2404.19756, Fig. 2.3; pykan's tutorial).

    python launch.py --exp=kan                   # default preset: about 1 minute on 2 CPU cores
    python launch.py --exp=kan --preset=smoke

Fits f(x, y) = exp(sin(pi x) + y^2) with a [2, 1, 1] KAN: 1000 training and 1000 test points
uniform on [-1, 1]^2, full-batch L-BFGS (`train.steps` iterations per grid, knots following the
layer inputs every 5 steps for the first 50, as pykan's fit does), then grid extension
3 -> 5 -> 10 -> 20 -> 50 -> 100 with the function kept by a least-squares refit. Float64
(jax_enable_x64) as in pykan's tutorial. pykan's tutorial reports test RMSE 1.53e-2, 3.29e-4,
4.04e-5, 1.24e-5 at G = 3, 10, 20, 50; README has what this gives.

summary.json: rmse_by_grid {G: test RMSE}, train_rmse_by_grid, refine_rmse_change {G: RMSE
between the outputs before and after extending to G}, scaling_slope (log-log slope of test RMSE
over G = 5..50); kan_grid_extension.png. The model/data/mesh sections of the config are unused;
train.steps and train.seed are the L-BFGS steps per grid and the seed.
Then pykan's hellokan pipeline on the same data: a [2, 5, 1] KAN with the sparsity regulariser,
pruned, refined, its edges replaced by formulas from {x, x^2, exp, sin}: summary keys
pruned_widths, symbolic_formula, symbolic_rmse. Not yet here: the special-function presets.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks import metrics as mlog
from jaxtricks.config import Config, flatten, to_dict
from jaxtricks.errors import ConfigError
from jaxtricks.models import kan_symbolic as sym
from jaxtricks.models.kan import KAN, fit, init_variables, mse, refine
from jaxtricks.models.kan_prune import Regularizer, prune
from jaxtricks.train.config import TrainConfig

PRESETS = ("smoke", "default", "full")
FUNCTIONS = {"exp_sin": lambda x: jnp.exp(jnp.sin(jnp.pi * x[:, :1]) + x[:, 1:2] ** 2)}


@dataclasses.dataclass(frozen=True)
class KanConfig(Config):
  function: str = "exp_sin"
  widths: tuple[int, ...] = (2, 1, 1)
  grids: tuple[int, ...] = (3, 5, 10, 20, 50, 100)
  order: int = 3
  n_train: int = 1000
  n_test: int = 1000
  update_grid_every: int = 5
  update_grid_until: int = 50
  float64: bool = True
  hellokan: bool = True                  # then the pipeline: regularise, prune, symbolic
  hello_widths: tuple[int, ...] = (2, 5, 1)
  hello_lamb: float = 1e-2
  hello_steps: int = 50                  # L-BFGS steps per stage
  hello_library: tuple[str, ...] = ("x", "x^2", "exp", "sin")

  def validate(self) -> KanConfig:
    if self.function not in FUNCTIONS:
      raise ConfigError(f"function={self.function!r} is unknown; valid: {', '.join(FUNCTIONS)}")
    if not self.grids or any(g < 1 for g in self.grids) or list(self.grids) != sorted(
        self.grids):
      raise ConfigError(f"grids={self.grids} must be increasing sizes >= 1")
    if len(self.widths) < 2 or self.widths[0] != 2 or self.widths[-1] != 1:
      raise ConfigError(f"widths={self.widths}: the function maps 2 inputs to 1 output")
    if self.train.steps < 1 or self.n_train < 1 or self.n_test < 1:
      raise ConfigError("train.steps, n_train and n_test must be >= 1")
    return self


def get_config(preset: str) -> KanConfig:
  if preset == "smoke":
    return KanConfig(grids=(3, 5), n_train=200, n_test=200, train=TrainConfig(steps=20),
                     hello_steps=10)
  return KanConfig(train=TrainConfig(steps=200))


def _slope(rmse_by_grid: dict[int, float], lo: int = 5, hi: int = 50) -> float | None:
  pts = [(math.log(g), math.log(r)) for g, r in rmse_by_grid.items() if lo <= g <= hi and r > 0]
  if len(pts) < 2:
    return None
  x, y = np.array(pts).T
  return float(np.polyfit(x, y, 1)[0])


def run(config: KanConfig, workdir: str) -> dict:
  t_start = time.time()
  if config.float64:
    jax.config.update("jax_enable_x64", True)
  dtype = jnp.float64 if config.float64 else jnp.float32
  os.makedirs(workdir, exist_ok=True)
  mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="kan"))
  rng = np.random.default_rng(config.train.seed)
  x_train = jnp.asarray(rng.uniform(-1, 1, (config.n_train, 2)), dtype)
  x_test = jnp.asarray(rng.uniform(-1, 1, (config.n_test, 2)), dtype)
  f = FUNCTIONS[config.function]
  y_train, y_test = f(x_train), f(x_test)
  # Initial values drawn in float32, then cast. In our runs, drawing them in float64 instead left
  # L-BFGS stuck near RMSE 0.67 for 5 of 5 seeds, against 1 of 5 seeds for float32 draws. The
  # cause is not yet understood.
  model = KAN(tuple(config.widths), grid_size=config.grids[0], order=config.order)
  variables = jax.tree.map(lambda a: a.astype(dtype),
                           init_variables(model, jax.random.key(config.train.seed)))
  model = dataclasses.replace(model, dtype="float64" if config.float64 else "float32")
  rmse, train_rmse, refine_change = {}, {}, {}
  for g in config.grids:
    if g != model.grid_size:
      before = model.apply(variables, x_train)
      model, variables = refine(model, variables, x_train, grid_size=g)
      refine_change[g] = float(jnp.sqrt(jnp.mean(jnp.square(model.apply(variables, x_train)
                                                            - before))))
    variables, losses = fit(model, variables, x_train, y_train, config.train.steps,
                            update_grid_every=config.update_grid_every,
                            update_grid_until=config.update_grid_until)
    train_rmse[g] = float(jnp.sqrt(losses[-1]))
    rmse[g] = float(jnp.sqrt(mse(model, variables, x_test, y_test)))
    mlog.log_progress(f"grid {g}: train RMSE {train_rmse[g]:.3e}, test RMSE {rmse[g]:.3e}")
  summary = {"exp": "kan", "function": config.function, "widths": list(config.widths),
             "rmse_by_grid": rmse, "train_rmse_by_grid": train_rmse,
             "refine_rmse_change": refine_change, "scaling_slope": _slope(rmse)}
  if config.hellokan:
    summary.update(hellokan(config, x_train, y_train, x_test, y_test, dtype))
  summary.update(wall_s=time.time() - t_start, config=flatten(config))
  plot = _plot(rmse, train_rmse, os.path.join(workdir, "kan_grid_extension.png"))
  if plot:
    summary["figures"] = [os.path.basename(plot)]
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def hellokan(config: KanConfig, x_train, y_train, x_test, y_test, dtype) -> dict:
  """pykan's hellokan: a [2, 5, 1] KAN trained with the sparsity regulariser, pruned, trained
  again, refined to G = 10, its edges replaced by library formulas and their affine parameters
  refitted; the formula and its test RMSE."""
  model = KAN(tuple(config.hello_widths), grid_size=3, order=config.order)
  variables = jax.tree.map(lambda a: a.astype(dtype),
                           init_variables(model, jax.random.key(config.train.seed)))
  model = dataclasses.replace(model, dtype="float64" if config.float64 else "float32")
  steps = config.hello_steps
  grid_kw = dict(update_grid_every=config.update_grid_every,
                 update_grid_until=config.update_grid_until)
  variables, _ = fit(model, variables, x_train, y_train, steps,
                     reg=Regularizer(model, lamb=config.hello_lamb), **grid_kw)
  model, variables, kept = prune(model, variables, x_train)
  variables, _ = fit(model, variables, x_train, y_train, steps, **grid_kw)
  model, variables = refine(model, variables, x_train, grid_size=10)
  variables, _ = fit(model, variables, x_train, y_train, steps)
  kan_rmse = float(jnp.sqrt(mse(model, variables, x_test, y_test)))
  fits = sym.auto_symbolic(model, variables, x_train[:200], names=config.hello_library)
  fits, _ = sym.fit_affine(fits, np.asarray(x_train), np.asarray(y_train), steps=4 * steps)
  sym_rmse = float(np.sqrt(np.mean((sym.evaluate(fits, np.asarray(x_test))
                                    - np.asarray(y_test)) ** 2)))
  out = {"pruned_widths": list(model.widths), "pruned_kept_nodes": kept,
         "pruned_kan_rmse": kan_rmse, "symbolic_rmse": sym_rmse,
         "symbolic_edges": [[[e.name for e in row] for row in layer] for layer in fits]}
  try:
    out["symbolic_formula"] = str(sym.formula(fits, variables=("x", "y"))[0])
  except ImportError:
    out["symbolic_formula"] = None  # the `symbolic` extra (sympy) is not installed
  mlog.log_progress(f"hellokan: pruned to {out['pruned_widths']}, KAN test RMSE {kan_rmse:.2e}, "
                    f"symbolic {out['symbolic_formula']} test RMSE {sym_rmse:.2e}")
  return out


def _plot(rmse: dict, train_rmse: dict, path: str) -> str | None:
  try:
    from jaxtricks.plotting import plot_loglog  # noqa: PLC0415 (matplotlib is optional)
  except ImportError:
    return None
  grids = list(rmse)
  ref = rmse[grids[0]] * (np.array(grids, float) / grids[0]) ** -4.0
  return plot_loglog({"train": (grids, [train_rmse[g] for g in grids], "o-"),
                      "test": (grids, [rmse[g] for g in grids], "s-"),
                      "G^-4": (grids, ref, "k--")}, path, "grid size G", "RMSE")

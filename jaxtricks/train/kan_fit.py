"""Full-batch training of KAN networks (Liu et al. 2024, arXiv 2404.19756) as pykan's fit: L-BFGS
(optax, zoom line search, history 10) or Adam on the MSE plus an optional regulariser, with the
knots following the layer inputs every few steps early in training (grid updates), and the
optimizer restarted after each update or its state carried across (`train.kan_state`).

The model, its grid updates and grid extension are `jaxtricks.models.kan`. Each chunk of steps
between grid updates is one compiled `lax.scan`, compiled once per (model, chunk length,
optimizer).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtricks.models.kan import KAN, mse, refine
from jaxtricks.train.kan_state import refine_with_opt_state


def fit(model: KAN, variables: dict, x_NxI: jnp.ndarray, y_NxO: jnp.ndarray, steps: int,
        optimizer: str = "lbfgs", lr: float = 1e-2, reg: Any = None,
        update_grid_every: int = 0, update_grid_until: int = 0,
        iters_per_step: int = 1, opt_state: Any = None, carry_state: bool = False,
        return_state: bool = False):
  """Full-batch training: `steps` steps of `iters_per_step` L-BFGS iterations each (optax, zoom
  line search, history 10) or Adam updates; returns the variables and the loss per iteration,
  and with return_state=True also the optimizer state (to continue with `opt_state=`, or to map
  across a grid extension with `kan_state.refine_with_opt_state`).

  One step of pykan's fit is one call of its L-BFGS, up to 20 iterations (torch's max_iter), so
  iters_per_step=20 trains as long as pykan's fit with the same `steps`.
  reg(params, grid, x) -> scalar (e.g. `models.kan_prune.Regularizer`, hashable) is added to the
  MSE when given. With update_grid_every = u > 0 the knots follow the layer inputs
  (`models.kan.refine` at the same G) every u steps until step update_grid_until, as pykan's fit
  does (5 and 50); the optimizer restarts after each update, or with carry_state=True keeps its
  state mapped onto the new knots. Compiled once per (model, chunk length, optimizer).
  """
  if optimizer not in ("lbfgs", "adam"):
    raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
  if iters_per_step < 1:
    raise ValueError(f"iters_per_step must be >= 1, got {iters_per_step}")
  steps, update_grid_every, update_grid_until = (
      steps * iters_per_step, update_grid_every * iters_per_step,
      update_grid_until * iters_per_step)
  init = _initializer(optimizer, float(lr))
  state = init(variables["params"]) if opt_state is None else opt_state
  losses, done = [], 0
  while done < steps:
    chunk = steps - done
    if update_grid_every > 0 and done < update_grid_until and model.basis == "bspline":
      chunk = min(update_grid_every, chunk)
    run = _runner(model, chunk, optimizer, float(lr), reg)
    params, state, part = run(variables["params"], variables["grid"], x_NxI, y_NxO, state)
    variables = {"params": params, "grid": variables["grid"]}
    losses.append(part)
    done += chunk
    if chunk == update_grid_every and done < min(update_grid_until, steps):
      if carry_state:
        _, variables, state = refine_with_opt_state(model, variables, x_NxI, state)
      else:
        _, variables = refine(model, variables, x_NxI)
        state = init(variables["params"])
  losses = jnp.concatenate(losses) if losses else jnp.zeros((0,), x_NxI.dtype)
  return (variables, losses, state) if return_state else (variables, losses)


@functools.lru_cache(maxsize=8)
def _optimizer(optimizer: str, lr: float) -> optax.GradientTransformation:
  return optax.lbfgs(memory_size=10) if optimizer == "lbfgs" else optax.adam(lr)


@functools.lru_cache(maxsize=8)
def _initializer(optimizer: str, lr: float):
  return jax.jit(_optimizer(optimizer, lr).init)  # one program, not one per eager op


@functools.lru_cache(maxsize=64)
def _runner(model: KAN, steps: int, optimizer: str, lr: float, reg: Any):
  tx = _optimizer(optimizer, lr)

  @jax.jit
  def run(params, grid, x_NxI, y_NxO, state):
    def loss(params):
      value = mse(model, {"params": params, "grid": grid}, x_NxI, y_NxO)
      return value if reg is None else value + reg(params, grid, x_NxI)

    def step(carry, _):
      params, state = carry
      if optimizer == "lbfgs":  # reuses the line search's last evaluation
        value, grad = optax.value_and_grad_from_state(loss)(params, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss)
      else:
        value, grad = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grad, state, params)
      return (optax.apply_updates(params, updates), state), value

    (params, state), losses = jax.lax.scan(step, (params, state), None, length=steps)
    return params, state, losses
  return run

"""KAN networks for function fitting (Liu et al. 2024, arXiv 2404.19756): a stack of KANLayers of
widths like [2, 5, 1], grid updates and grid extension that keep the learned function, and
full-batch L-BFGS or Adam training.

Variables are {'params': ..., 'grid': {'layer_l': {'knots': (I, G + 2k + 1)}}}. Grid extension
changes parameter shapes: `refine` returns a new module (another grid_size) with new variables,
and the next `fit` compiles once for the new shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxtricks.layers.kan import KANLayer
from jaxtricks.models.kan_state import carry_opt_state
from jaxtricks.ops import kan


class KAN(nn.Module):
  widths: tuple[int, ...]
  grid_size: int = 5
  order: int = 3
  grid_range: tuple[float, float] = (-1.0, 1.0)
  basis: str = "bspline"
  init_style: str = "pykan"
  noise_scale: float = 0.1
  base_mu: float = 0.0
  base_sigma: float = 1.0
  dtype: str = "float32"       # 'float64' with jax_enable_x64 for function fitting to 1e-5
  analytic_grad: bool = True   # B-spline input gradients by the analytic derivative
  # Grid updates keep the first layer's knots spanning grid_range (the input domain) instead of
  # only the samples' hull (pykan's): test inputs just outside the hull are not extrapolated.
  grid_spans_range: bool = False

  def layer_kwargs(self) -> dict:
    return dict(grid_size=self.grid_size, order=self.order, grid_range=self.grid_range,
                basis=self.basis, init_style=self.init_style, noise_scale=self.noise_scale,
                base_mu=self.base_mu, base_sigma=self.base_sigma, dtype=self.dtype,
                param_dtype=self.dtype, analytic_grad=self.analytic_grad)

  @nn.compact
  def __call__(self, x_NxI: jnp.ndarray, return_edges: bool = False):
    """(N, widths[0]) -> (N, widths[-1]); with return_edges also, per layer, its input and phi
    (N, O, I)."""
    if x_NxI.shape[-1] != self.widths[0]:
      raise ValueError(f"KAN{list(self.widths)} takes {self.widths[0]} inputs, got "
                       f"{x_NxI.shape[-1]}")
    inputs, edges = [], []
    for layer, width in enumerate(self.widths[1:]):
      inputs.append(x_NxI)
      out = KANLayer(width, name=f"layer_{layer}", **self.layer_kwargs())(x_NxI, return_edges)
      x_NxI, phi = out if return_edges else (out, None)
      edges.append(phi)
    return (x_NxI, inputs, edges) if return_edges else x_NxI


def init_variables(model: KAN, rng: jax.Array) -> dict:
  x = jnp.zeros((1, model.widths[0]), model.dtype)
  return nn.unbox(jax.jit(model.init)(rng, x))  # compiled: see `forward`


def refine(model: KAN, variables: dict, x_NxI: jnp.ndarray, grid_size: int | None = None,
           grid_eps: float = 0.02, ridge: float = 1e-8, opt_state: Any = None):
  """Grid update (same G) or extension (G -> grid_size): per layer, knots from the samples'
  activations at that layer, and spline coefficients refitted by least squares to the old
  splines at those samples, so the network's function is kept (up to the fit error).

  Returns (new model, new variables); with `opt_state` (an optax Adam or L-BFGS state from
  `fit(..., return_state=True)`) also that state mapped onto the new coefficients
  (`kan_state.carry_opt_state`), to continue training without restarting the optimizer.
  """
  if model.basis != "bspline":
    raise ValueError(f"grid updates need the B-spline basis, this KAN uses {model.basis!r}")
  new_model = dataclasses.replace(model, grid_size=grid_size or model.grid_size)
  with_maps = opt_state is not None
  params, grids, maps = _refitter(model, new_model.grid_size, float(grid_eps), float(ridge),
                                  with_maps)(variables["params"], variables["grid"], x_NxI)
  new_variables = {"params": params, "grid": grids}
  if not with_maps:
    return new_model, new_variables
  return new_model, new_variables, carry_opt_state(opt_state, maps, params)


@functools.lru_cache(maxsize=64)
def _refitter(model: KAN, grid_size: int, grid_eps: float, ridge: float, with_maps: bool):
  """One compiled program per (model, new G) instead of op-by-op dispatch; with_maps also gives
  each layer's refit matrix M (I, G' + k, G + k), the linear map old -> new coefficients."""
  @jax.jit
  def run(params, grids, x_NxI):
    _, inputs, _ = model.apply({"params": params, "grid": grids}, x_NxI, return_edges=True)
    params, grids, maps = dict(params), dict(grids), {}
    for layer, x_in in enumerate(inputs):
      name = f"layer_{layer}"
      p, old = params[name], grids[name]["knots"]
      values = kan.spline_values(x_in, old, p["coef"], model.order)
      span = model.grid_range if model.grid_spans_range and layer == 0 else None
      new = kan.grid_from_samples(x_in, grid_size, model.order, grid_eps, span)
      params[name] = dict(p, coef=kan.fit_coefficients(x_in, values, new, model.order, ridge))
      grids[name] = dict(grids[name], knots=new)  # a pruning mask stays
      if with_maps:
        maps[name] = kan.refit_matrix(x_in, old, new, model.order, ridge)
    return params, grids, maps
  return run


def forward(model: KAN, variables: dict, x_NxI: jnp.ndarray, return_edges: bool = False):
  """`model.apply` as one compiled program per (model, return_edges, shapes): applied eagerly, a
  KAN compiles each of its many small primitives separately, which dominated short runs."""
  return _forward(model, return_edges)(variables, x_NxI)


@functools.lru_cache(maxsize=128)
def _forward(model: KAN, return_edges: bool):
  return jax.jit(lambda variables, x_NxI: model.apply(variables, x_NxI, return_edges))


def mse(model: KAN, variables: dict, x_NxI: jnp.ndarray, y_NxO: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(jnp.square(forward(model, variables, x_NxI) - y_NxO))


def fit(model: KAN, variables: dict, x_NxI: jnp.ndarray, y_NxO: jnp.ndarray, steps: int,
        optimizer: str = "lbfgs", lr: float = 1e-2, reg: Any = None,
        update_grid_every: int = 0, update_grid_until: int = 0,
        iters_per_step: int = 1, opt_state: Any = None, carry_state: bool = False,
        return_state: bool = False):
  """Full-batch training: `steps` steps of `iters_per_step` L-BFGS iterations each (optax, zoom
  line search, history 10) or Adam updates; returns the variables and the loss per iteration,
  and with return_state=True also the optimizer state (to continue with `opt_state=`, or to map
  across a grid extension with `refine(..., opt_state=)`).

  One step of pykan's fit is one call of its L-BFGS, up to 20 iterations (torch's max_iter), so
  iters_per_step=20 trains as long as pykan's fit with the same `steps`.
  reg(params, grid, x) -> scalar (e.g. `kan_prune.Regularizer`, hashable) is added to the MSE
  when given. With update_grid_every = u > 0 the knots follow the layer inputs (`refine` at the
  same G) every u steps until step update_grid_until, as pykan's fit does (5 and 50); the
  optimizer restarts after each update, or with carry_state=True keeps its state mapped onto the
  new knots. Compiled once per (model, chunk length, optimizer).
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
        _, variables, state = refine(model, variables, x_NxI, opt_state=state)
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

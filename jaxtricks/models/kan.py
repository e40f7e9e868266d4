"""KAN networks for function fitting (Liu et al. 2024, arXiv 2404.19756): a stack of KANLayers of
widths like [2, 5, 1], and grid updates and grid extension that keep the learned function.
Training (full-batch L-BFGS or Adam) is `jaxtricks.train.kan_fit`.

Variables are {'params': ..., 'grid': {'layer_l': {'knots': (I, G + 2k + 1)}}}. Grid extension
changes parameter shapes: `refine` returns a new module (another grid_size) with new variables,
and the next `train.kan_fit.fit` compiles once for the new shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.layers.kan import KANLayer
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
  closed_form: bool = True     # closed-form bases while a layer's grid is uniform
  # Grid updates keep the first layer's knots spanning grid_range (the input domain) instead of
  # only the samples' hull (pykan's): test inputs just outside the hull are not extrapolated.
  grid_spans_range: bool = False

  def layer_kwargs(self) -> dict:
    return dict(grid_size=self.grid_size, order=self.order, grid_range=self.grid_range,
                basis=self.basis, init_style=self.init_style, noise_scale=self.noise_scale,
                base_mu=self.base_mu, base_sigma=self.base_sigma, dtype=self.dtype,
                param_dtype=self.dtype, analytic_grad=self.analytic_grad,
                closed_form=self.closed_form)

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
           grid_eps: float = 0.02, ridge: float = 1e-8, return_maps: bool = False):
  """Grid update (same G) or extension (G -> grid_size): per layer, knots from the samples'
  activations at that layer, and spline coefficients refitted by least squares to the old
  splines at those samples, so the network's function is kept (up to the fit error).

  Returns (new model, new variables); with return_maps=True also the refit matrices
  {layer name: M (I, G' + k, G + k)}, the linear maps old -> new coefficients, through which
  `train.kan_state.refine_with_opt_state` maps an optimizer state onto the new coefficients.
  """
  if model.basis != "bspline":
    raise ValueError(f"grid updates need the B-spline basis, this KAN uses {model.basis!r}")
  new_model = dataclasses.replace(model, grid_size=grid_size or model.grid_size)
  refit = _refitter(model, new_model.grid_size, float(grid_eps), float(ridge), bool(return_maps))
  params, grids, maps = refit(variables["params"], variables["grid"], x_NxI)
  new_variables = {"params": params, "grid": grids}
  return (new_model, new_variables, maps) if return_maps else (new_model, new_variables)


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
      # A pruning mask stays; the uniform marker goes (the new knots follow the samples).
      grids[name] = {**{k: v for k, v in grids[name].items() if k != "uniform"}, "knots": new}
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

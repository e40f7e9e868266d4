"""A Kolmogorov-Arnold layer (Liu et al. 2024, arXiv 2404.19756) over jaxtricks.ops.kan.

Parameters: `coef` (I, O, J) spline coefficients, `w_base` and `w_spline` (I, O). The B-spline
knots live in the `grid` collection (`knots`, (I, G + 2k + 1)) so that grid updates can move them
without the optimizer seeing them; a model applied with `params` only uses the uniform grid of
its config, which is also what `init` creates. `init` also writes a `uniform` marker there, which
grid updates drop: a layer whose grid is uniform (no grid collection, or the marker present) takes
the closed-form bases of `jaxtricks.ops.kan_uniform`, any other the Cox-de Boor recursion. The
choice is static (the collection's structure), never a test of the knots per call. An optional
`mask` (I, O) in the same collection switches pruned edges off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.ops import kan, kan_uniform
from jaxtricks.registry import Component, register

BASES = ("bspline", "rbf", "chebyshev")
INITS = ("pykan", "efficient")


def n_basis(basis: str, grid_size: int, order: int) -> int:
  return {"bspline": grid_size + order, "rbf": grid_size, "chebyshev": grid_size + 1}[basis]


class KANLayer(nn.Module):
  """y_o = sum_i w_b[i, o] silu(x_i) + w_s[i, o] sum_j c[i, o, j] b_j(x_i).

  init_style "pykan": coefficients of small noise (noise_scale / G), w_b = mu / sqrt(I) +
  sigma U[-1, 1] / sqrt(I), w_s = 1 / sqrt(I) (pykan's defaults). init 'efficient': w_b and w_s
  Kaiming-uniform (bound 1 / sqrt(I)), as efficient-kan, whose authors report it trains deep
  networks far better.
  """
  features: int
  grid_size: int = 5
  order: int = 3
  grid_range: tuple[float, float] = (-1.0, 1.0)
  basis: str = "bspline"
  init_style: str = "pykan"
  noise_scale: float = 0.1
  base_mu: float = 0.0
  base_sigma: float = 1.0
  axes: tuple[str, str] = ("kan_in", "kan_out")
  dtype: str = "float32"
  param_dtype: str = "float32"
  analytic_grad: bool = True   # B-spline input gradient by the analytic derivative (custom VJP)
  closed_form: bool = True     # closed-form bases on uniform grids (False: always the recursion)

  def knots(self, n_in: int) -> tuple[jnp.ndarray, bool]:
    """(knots (I, G + 2k + 1), whether they are uniform)."""
    uniform = lambda: kan.uniform_grid(n_in, self.grid_size, self.order, *self.grid_range,
                                       dtype=resolve_dtype(self.param_dtype))
    if self.is_mutable_collection("grid") or self.has_variable("grid", "knots"):
      knots = self.variable("grid", "knots", uniform).value
      if self.is_initializing():
        self.variable("grid", "uniform", lambda: jnp.ones((), jnp.bool_))
      return knots, self.has_variable("grid", "uniform")
    return uniform(), True

  def bases(self, x_NxI: jnp.ndarray, knots=None) -> jnp.ndarray:
    """Basis values as planes (N, J, I), the matmul form's layout (B-spline: by the recursion,
    on `knots` or the layer's own)."""
    lo, hi = self.grid_range
    if self.basis == "bspline":
      knots = self.knots(x_NxI.shape[-1])[0] if knots is None else knots
      return kan.bspline_planes(x_NxI, knots, self.order, self.analytic_grad)
    if self.basis == "rbf":
      centres = jnp.linspace(lo, hi, self.grid_size, dtype=x_NxI.dtype)
      basis_NxIxJ = kan.rbf_basis(x_NxI, centres, (hi - lo) / max(self.grid_size - 1, 1))
    else:
      basis_NxIxJ = kan.chebyshev_basis(x_NxI, self.grid_size)
    return jnp.swapaxes(basis_NxIxJ, 1, 2)

  @nn.compact
  def __call__(self, x: jnp.ndarray, return_edges: bool = False):
    """(..., I) -> (..., O); with return_edges also phi (N, O, I) for the flattened rows."""
    if self.basis not in BASES or self.init_style not in INITS:
      raise ValueError(f"KANLayer: basis must be one of {BASES} and init one of {INITS}, got "
                       f"{self.basis!r} and {self.init_style!r}")
    n_in, dtype, pdtype = x.shape[-1], resolve_dtype(self.dtype), resolve_dtype(self.param_dtype)
    j = n_basis(self.basis, self.grid_size, self.order)
    bound = n_in ** -0.5
    uniform = lambda lo, hi: lambda key, shape, dt: jax.random.uniform(key, shape, dt, lo, hi)
    noise = self.noise_scale / self.grid_size
    coef = self.param("coef", nn.with_logical_partitioning(
        uniform(-noise / 2, noise / 2), (self.axes[0], self.axes[1], None)),
        (n_in, self.features, j), pdtype)
    if self.init_style == "pykan":
      base_init = lambda key, shape, dt: (self.base_mu * bound + self.base_sigma * bound
                                          * jax.random.uniform(key, shape, dt, -1.0, 1.0))
      spline_init = lambda key, shape, dt: jnp.full(shape, bound, dt)
    else:
      base_init = spline_init = uniform(-bound, bound)
    w_base = self.param("w_base", nn.with_logical_partitioning(base_init, self.axes),
                        (n_in, self.features), pdtype)
    w_spline = self.param("w_spline", nn.with_logical_partitioning(spline_init, self.axes),
                          (n_in, self.features), pdtype)
    if self.has_variable("grid", "mask"):  # pruned edges (models.kan_prune.prune_edges)
      mask = self.get_variable("grid", "mask").astype(w_base.dtype)
      w_base, w_spline = w_base * mask, w_spline * mask
    lead = x.shape[:-1]
    x_NxI = x.reshape(-1, n_in).astype(dtype)
    weights = (coef.astype(dtype), w_base.astype(dtype), w_spline.astype(dtype))
    knots, uniform = self.knots(n_in) if self.basis == "bspline" else (None, False)
    if uniform and self.closed_form and self.analytic_grad:
      # [bases, silu(x)] in one fused pass each way (closed form on the uniform grid)
      feats_NxKxI = kan_uniform.uniform_features(x_NxI, knots, self.order)
      basis_NxJxI = feats_NxKxI[:, :-1]
      y = kan.kan_matmul_features(feats_NxKxI, *weights)
    else:
      basis_NxJxI = self.bases(x_NxI, knots)
      y = kan.kan_matmul_planes(x_NxI, basis_NxJxI, *weights)
    y = y.reshape(*lead, self.features)
    if not return_edges:
      return y
    return y, kan.kan_edges(x_NxI, jnp.swapaxes(basis_NxJxI, 1, 2), *weights)


class KANFeedForward(nn.Module):
  """A Transformer feed-forward block of two KAN layers, d -> hidden -> d (the KAN paper's
  suggestion of KANs in place of MLPs). Inputs are RMS-normalised (unit scale), so the knots
  span [-grid_range, grid_range]; the output is scaled by 1/sqrt(2 L) like other residual
  branches. Each KAN layer costs about (G + k + 2) times a dense layer of the same shape."""
  hidden: int
  grid_size: int = 5
  order: int = 3
  grid_range: float = 3.0
  n_layers: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxTxD: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # no train-only behaviour
    kw = dict(grid_size=self.grid_size, order=self.order, init_style="efficient",
              grid_range=(-self.grid_range, self.grid_range), dtype=self.dtype,
              param_dtype=self.param_dtype)
    h_BxTxF = KANLayer(self.hidden, axes=("embed", "mlp"), name="up", **kw)(x_BxTxD)
    y_BxTxD = KANLayer(x_BxTxD.shape[-1], axes=("mlp", "embed"), name="down", **kw)(h_BxTxF)
    return y_BxTxD * (2 * self.n_layers) ** -0.5


@register("mlp", "kan")
@dataclasses.dataclass(frozen=True)
class KANMLPConfig(Component):
  """Two KAN layers d -> d_ff -> d in place of the MLP (`KANFeedForward`)."""
  d_ff: int = 0          # hidden width; 0 means d_model
  grid: int = 5          # B-spline intervals
  order: int = 3
  range: float = 3.0     # knots span [-range, range] (inputs are RMS-normalised)
  reg_lamb: float = 0.0  # sparsity regulariser weight (0: none; jaxtricks.train.kan_ffn_reg)
  reg_entropy: float = 2.0  # its entropy term's weight against the L1 term
  has_projections: ClassVar[bool] = False  # no linear projections for a projection kind

  def width(self, model: Any) -> int:
    return self.d_ff or model.d_model

  def validate(self, model: Any) -> None:
    for name, ok, bound in (("d_ff", self.d_ff >= 0, ">= 0"), ("grid", self.grid >= 1, ">= 1"),
                            ("order", self.order >= 0, ">= 0"), ("range", self.range > 0, "> 0"),
                            ("reg_lamb", self.reg_lamb >= 0, ">= 0"),
                            ("reg_entropy", self.reg_entropy >= 0, ">= 0")):
      if not ok:
        raise ConfigError(f"model.mlp.{name}={getattr(self, name)} must be {bound}")

  def build(self, model: Any, projection: Callable) -> nn.Module:
    del projection  # spline edges, not linear projections
    return KANFeedForward(self.width(model), self.grid, self.order, self.range,
                          n_layers=model.n_layers, dtype=model.dtype,
                          param_dtype=model.param_dtype, name="mlp")

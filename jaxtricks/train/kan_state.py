"""Optimizer state carried across a KAN grid update or grid extension (Liu et al. 2024,
arXiv 2404.19756, Sec. 2.4).

A refit is linear per input i: the new coefficients are c' = M_i c with
M_i = (B'_i^T B'_i + lam)^{-1} B'_i^T B_i, where B_i and B'_i are the old and new bases at the
samples (`ops.kan.refit_matrix`). The optimizer state is mapped consistently with that:

  primal quantities (L-BFGS's last iterate and steps s): s' = M s;
  dual quantities (gradients, Adam's first moment, L-BFGS's gradient differences y):
    y' = P y with P = M (M^T M)^{-1}, the minimum-norm y' with M^T y' = y, so that
    s'^T y' = s^T y and L-BFGS's curvature pairs (and rho = 1 / s^T y) stay valid; damped
    where M is ill-conditioned (`dual_matrices`);
  Adam's second moment, treated as per-coefficient variances of independent components:
    nu' = (P * P) nu, which stays non-negative.

Parameters whose shapes do not depend on the grid (w_base, w_spline) keep their state. The
zoom line search's cached value and gradient are cleared, so the next step evaluates the loss at
the refitted parameters. Other optax states raise a ConfigError naming the state.
`refine_with_opt_state` is `models.kan.refine` with the state mapped along.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.models.kan import KAN, refine

PRIMAL, DUAL, SECOND, RESET = "primal", "dual", "second", "reset"
# (optax state class name, field) -> how a params-shaped field transforms under c' = M c
FIELDS = {
    ("ScaleByAdamState", "mu"): DUAL,
    ("ScaleByAdamState", "nu"): SECOND,
    ("ScaleByLBFGSState", "params"): PRIMAL,
    ("ScaleByLBFGSState", "updates"): DUAL,
    ("ScaleByLBFGSState", "diff_params_memory"): PRIMAL,
    ("ScaleByLBFGSState", "diff_updates_memory"): DUAL,
    ("ScaleByZoomLinesearchState", "grad"): RESET,
}
# states with no params-shaped field, or whose other fields are scalars kept as they are
KEPT = ("EmptyState", "ScaleByAdamState", "ScaleByLBFGSState", "ScaleByZoomLinesearchState")


def dual_matrices(m_IxKxJ: jnp.ndarray, damping: float = 1e-2) -> jnp.ndarray:
  """P = M (M^T M + lam)^{-1}, (I, K, J), lam = damping * the largest eigenvalue of M^T M.

  Undamped, P pulls covectors back exactly ((M s) . (P y) = s . y) but is ill-conditioned when
  the samples barely touch some old basis functions (a layer's inputs moved away from its old
  knots): those directions would then carry huge moments (Adam's nu grew 1e9-fold in such a
  refit, freezing the layer). The damping keeps the pairing on the directions the samples
  determine and shrinks the others towards a fresh start.
  """
  mtm = jnp.einsum("IKJ,IKL->IJL", m_IxKxJ, m_IxKxJ)
  eig, vec = jnp.linalg.eigh(mtm)
  lam = damping * eig[:, -1:]
  inv = jnp.einsum("IJE,IE,ILE->IJL", vec, 1.0 / (jnp.maximum(eig, 0.0) + lam), vec)
  return jnp.einsum("IKJ,IJL->IKL", m_IxKxJ, inv)


def _apply(mat_IxKxJ: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
  """coef-shaped (I, O, J), or (memory, I, O, J), -> (..., I, O, K)."""
  return jnp.einsum("IKJ,...IOJ->...IOK", mat_IxKxJ, c)


def _map_params(tree: dict, kind: str, maps: dict[str, jnp.ndarray],
                duals: dict[str, jnp.ndarray], new_params: dict) -> dict:
  out = {}
  for layer, leaves in tree.items():
    out[layer] = dict(leaves)
    if layer not in maps:
      continue
    coef = leaves["coef"]
    if kind == PRIMAL:
      out[layer]["coef"] = _apply(maps[layer], coef)
    elif kind == DUAL:
      out[layer]["coef"] = _apply(duals[layer], coef)
    elif kind == SECOND:
      out[layer]["coef"] = _apply(jnp.square(duals[layer]), coef)
    else:  # RESET: the line search's cached gradient, recomputed at the next step
      lead = coef.shape[:coef.ndim - 3]
      out[layer]["coef"] = jnp.zeros((*lead, *new_params[layer]["coef"].shape), coef.dtype)
  return out


def carry_opt_state(opt_state: Any, maps: dict[str, jnp.ndarray], new_params: dict) -> Any:
  """The optax state of `optax.adam` or `optax.lbfgs` (a chain of the states in FIELDS) mapped
  through the refit matrices `maps` {layer name: M (I, G' + k, G + k)}."""
  duals = {layer: dual_matrices(m) for layer, m in maps.items()}
  states = opt_state if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields") \
      else (opt_state,)
  mapped = []
  for state in states:
    name = type(state).__name__
    if name not in KEPT:
      raise ConfigError(f"cannot carry optimizer state {name} across a KAN refine (Adam and "
                        "L-BFGS states can be carried); restart the optimizer instead")
    fields = {}
    for field in getattr(state, "_fields", ()):
      value = getattr(state, field)
      kind = FIELDS.get((name, field))
      if kind is not None:
        value = _map_params(value, kind, maps, duals, new_params)
      elif field == "value" and name == "ScaleByZoomLinesearchState":
        value = jnp.full_like(value, jnp.inf)  # inf: value_and_grad_from_state recomputes
      fields[field] = value
    mapped.append(state._replace(**fields) if fields else state)
  return tuple(mapped) if states is opt_state else mapped[0]


def refine_with_opt_state(model: KAN, variables: dict, x_NxI: jnp.ndarray, opt_state: Any,
                          grid_size: int | None = None, grid_eps: float = 0.02,
                          ridge: float = 1e-8) -> tuple[KAN, dict, Any]:
  """`models.kan.refine` (grid update, or extension to grid_size) that also maps `opt_state` (an
  optax Adam or L-BFGS state from `train.kan_fit.fit(..., return_state=True)`) onto the new
  coefficients, to continue training without restarting the optimizer. Returns (new model, new
  variables, new optimizer state)."""
  new_model, new_variables, maps = refine(model, variables, x_NxI, grid_size=grid_size,
                                          grid_eps=grid_eps, ridge=ridge, return_maps=True)
  return new_model, new_variables, carry_opt_state(opt_state, maps, new_variables["params"])

"""Symbolic regression on KAN edges (Liu et al. 2024, arXiv 2404.19756, section 2.5.1 step 3).

Each edge's learned curve phi(x) is matched against a library of functions f as
    phi(x) ~ c f(a x + b) + d:
a grid search over (a, b) in [-10, 10]^2 (101 x 101, zoomed three times around the best point)
maximises the r^2 of the linear fit of phi on f(a x + b), and (c, d) come from that fit.
`suggest` ranks the library by 0.8 complexity + 0.2 log2(1 + 1e-5 - r^2) (pykan's rule), and
`auto_symbolic` replaces every edge by its best formula; `formula` then writes the network as a
sympy expression (sympy is the optional `symbolic` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtricks.models.kan import KAN, forward

# name -> (numpy function, sympy builder (called with the sympy module and the argument),
# complexity)
LIBRARY: dict[str, tuple[Callable, Callable, int]] = {
    "x": (lambda u: u, lambda sp, u: u, 1),
    "x^2": (lambda u: u ** 2, lambda sp, u: u ** 2, 2),
    "x^3": (lambda u: u ** 3, lambda sp, u: u ** 3, 3),
    "x^4": (lambda u: u ** 4, lambda sp, u: u ** 4, 3),
    "exp": (lambda u: np.exp(np.clip(u, -50, 50)), lambda sp, u: sp.exp(u), 2),
    "sin": (np.sin, lambda sp, u: sp.sin(u), 2),
    "tanh": (np.tanh, lambda sp, u: sp.tanh(u), 3),
    "sqrt": (lambda u: np.sqrt(np.abs(u)), lambda sp, u: sp.sqrt(sp.Abs(u)), 2),
    "log": (lambda u: np.log(np.abs(u) + 1e-4), lambda sp, u: sp.log(sp.Abs(u) + 1e-4), 2),
    "abs": (np.abs, lambda sp, u: sp.Abs(u), 3),
    "gaussian": (lambda u: np.exp(-u ** 2), lambda sp, u: sp.exp(-u ** 2), 3),
    "0": (lambda u: 0 * u, lambda sp, u: 0, 0),
}


@dataclasses.dataclass(frozen=True)
class Fit:
  name: str
  a: float
  b: float
  c: float
  d: float
  r2: float

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return self.c * LIBRARY[self.name][0](self.a * x + self.b) + self.d


def _linear_fit(f_MxN: np.ndarray, y_N: np.ndarray):
  """Per candidate row: slope, intercept and r^2 of y ~ c f + d."""
  fm = f_MxN - f_MxN.mean(1, keepdims=True)
  ym = y_N - y_N.mean()
  cov = fm @ ym
  var_f, var_y = (fm ** 2).sum(1), (ym ** 2).sum()
  r2 = np.where(var_f > 1e-12, cov ** 2 / (var_f * var_y + 1e-30), 0.0)
  c = np.where(var_f > 1e-12, cov / np.maximum(var_f, 1e-30), 0.0)
  d = y_N.mean() - c * f_MxN.mean(1)
  return c, d, r2


def fit_params(x: np.ndarray, y: np.ndarray, name: str, a_range=(-10.0, 10.0),
               b_range=(-10.0, 10.0), points: int = 101, zooms: int = 3) -> Fit:
  """Best y ~ c f(a x + b) + d for the library function `name` (float64 numpy)."""
  f = LIBRARY[name][0]
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if name == "0":
    return Fit(name, 0.0, 0.0, 0.0, float(y.mean()), 0.0)
  (a_lo, a_hi), (b_lo, b_hi) = a_range, b_range
  best = (0.0, 1.0, 0.0)
  for _ in range(zooms + 1):
    a_grid, b_grid = np.linspace(a_lo, a_hi, points), np.linspace(b_lo, b_hi, points)
    aa, bb = np.meshgrid(a_grid, b_grid, indexing="ij")
    with np.errstate(all="ignore"):
      vals = f(aa.reshape(-1, 1) * x[None] + bb.reshape(-1, 1))
    vals = np.where(np.isfinite(vals), vals, 0.0)
    _, _, r2 = _linear_fit(vals, y)
    k = int(np.nanargmax(r2))
    best = (float(r2[k]), float(aa.reshape(-1)[k]), float(bb.reshape(-1)[k]))
    da, db = (a_hi - a_lo) / (points - 1), (b_hi - b_lo) / (points - 1)
    a_lo, a_hi, b_lo, b_hi = best[1] - 2 * da, best[1] + 2 * da, best[2] - 2 * db, best[2] + 2 * db
  _, a, b = best
  c, d, r2 = _linear_fit(f(a * x + b)[None], y)
  return Fit(name, a, b, float(c[0]), float(d[0]), float(r2[0]))


def suggest(x: np.ndarray, y: np.ndarray, names: tuple[str, ...] | None = None) -> list[Fit]:
  """Library fits ranked by 0.8 complexity + 0.2 log2(1 + 1e-5 - r^2), best first."""
  fits = [fit_params(x, y, n) for n in (names or tuple(LIBRARY))]
  score = lambda ft: 0.8 * LIBRARY[ft.name][2] + 0.2 * np.log2(1 + 1e-5 - min(ft.r2, 1.0))
  return sorted(fits, key=score)


def edge_samples(model: KAN, variables: dict, x_NxI: jnp.ndarray):
  """Per layer: the layer's inputs (N, I) and its edge outputs phi (N, O, I), as numpy."""
  _, inputs, edges = forward(model, variables, x_NxI, return_edges=True)
  return [(np.asarray(i, np.float64), np.asarray(e, np.float64)) for i, e in zip(
      inputs, edges, strict=True)]


def auto_symbolic(model: KAN, variables: dict, x_NxI: jnp.ndarray,
                  names: tuple[str, ...] | None = None) -> list[list[list[Fit]]]:
  """The best-ranked formula of every edge: fits[layer][o][i]."""
  out = []
  for x_in, phi in edge_samples(model, variables, x_NxI):
    out.append([[suggest(x_in[:, i], phi[:, o, i], names)[0] for i in range(phi.shape[2])]
                for o in range(phi.shape[1])])
  return out


def evaluate(fits: list[list[list[Fit]]], x_NxI: np.ndarray) -> np.ndarray:
  """The symbolic network's output (N, O) with every edge replaced by its formula."""
  h = np.asarray(x_NxI, np.float64)
  for layer in fits:
    h = np.stack([sum(edge(h[:, i]) for i, edge in enumerate(row)) for row in layer], axis=1)
  return h


def formula(fits: list[list[list[Fit]]], digits: int = 4, variables: tuple[str, ...] = (),
            zero_below: float = 0.0):
  """sympy expressions of the outputs (needs `pip install jaxtricks[symbolic]`). Shifts b and d
  with |value| < zero_below are written as 0 (they are rounding noise after `fit_affine`)."""
  import sympy as sp  # noqa: PLC0415 (optional dependency)

  n_in = len(fits[0][0])
  names = variables or tuple(f"x_{i + 1}" for i in range(n_in))
  h = list(sp.symbols(names))
  num = lambda v, shift=False: sp.Float(0.0 if shift and abs(v) < zero_below else v, digits)
  for layer in fits:
    h = [sum(num(e.c) * LIBRARY[e.name][1](sp, num(e.a) * h[i] + num(e.b, True)) + num(e.d, True)
             for i, e in enumerate(row)) for row in layer]
  return [sp.simplify(expr) for expr in h]


def fit_affine(fits: list[list[list[Fit]]], x_NxI, y_NxO, steps: int = 200):
  """Refines every (a, b, c, d) of the symbolic network by full-batch L-BFGS on the data (pykan's
  retrain of affine parameters after auto_symbolic); returns the updated fits and the final MSE."""
  flat = [(lyr, o, i) for lyr, layer in enumerate(fits) for o, row in enumerate(layer)
          for i in range(len(row))]
  theta = jnp.asarray([[fits[lyr][o][i].a, fits[lyr][o][i].b, fits[lyr][o][i].c,
                        fits[lyr][o][i].d] for lyr, o, i in flat])
  jfns = {"x": lambda u: u, "x^2": jnp.square, "x^3": lambda u: u ** 3, "x^4": lambda u: u ** 4,
          "exp": lambda u: jnp.exp(jnp.clip(u, -50, 50)), "sin": jnp.sin, "tanh": jnp.tanh,
          "sqrt": lambda u: jnp.sqrt(jnp.abs(u)), "log": lambda u: jnp.log(jnp.abs(u) + 1e-4),
          "abs": jnp.abs, "gaussian": lambda u: jnp.exp(-u ** 2), "0": lambda u: 0 * u}
  x = jnp.asarray(x_NxI, theta.dtype)
  y = jnp.asarray(y_NxO, theta.dtype)

  def forward(theta):
    h, k = x, 0
    for layer in fits:
      outs = []
      for row in layer:
        acc = 0.0
        for i, e in enumerate(row):
          a, b, c, d = theta[k]
          acc = acc + c * jfns[e.name](a * h[:, i] + b) + d
          k += 1
        outs.append(acc)
      h = jnp.stack(outs, axis=1)
    return h

  loss = lambda t: jnp.mean(jnp.square(forward(t) - y))
  tx = optax.lbfgs(memory_size=10)

  @jax.jit
  def run(theta):
    def step(carry, _):
      theta, state = carry
      value, grad = optax.value_and_grad_from_state(loss)(theta, state=state)
      updates, state = tx.update(grad, state, theta, value=value, grad=grad, value_fn=loss)
      return (optax.apply_updates(theta, updates), state), value
    return jax.lax.scan(step, (theta, tx.init(theta)), None, length=steps)[0][0]

  theta = run(theta)
  new = [[list(row) for row in layer] for layer in fits]
  for (lyr, o, i), (a, b, c, d) in zip(flat, np.asarray(theta), strict=True):
    new[lyr][o][i] = dataclasses.replace(fits[lyr][o][i], a=float(a), b=float(b), c=float(c),
                                         d=float(d))
  return new, float(loss(theta))

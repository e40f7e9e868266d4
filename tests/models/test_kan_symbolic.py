"""Symbolic regression: parameter recovery on the paper's example, ranking, the sympy formula
against the symbolic network, and a trained KAN's edges recovered as exp(sin(pi x) + y^2)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.models import kan_symbolic as sym
from jaxtricks.models.kan import KAN, init_variables
from jaxtricks.train.kan_fit import fit

sp = pytest.importorskip("sympy")  # the optional `symbolic` extra; CI installs it with `test`


def test_fit_params_recovers_the_papers_example():
  x = np.linspace(-1, 1, 200)
  fitted = sym.fit_params(x, 5 * np.sin(3 * x + 2) + 0.7, "sin")
  assert fitted.r2 > 0.9999
  np.testing.assert_allclose(fitted(x), 5 * np.sin(3 * x + 2) + 0.7, atol=1e-2)
  ranked = sym.suggest(x, 5 * np.sin(3 * x + 2) + 0.7, ("x", "x^2", "exp", "sin"))
  assert ranked[0].name == "sin"


def test_formula_evaluates_to_the_symbolic_network():
  fits = [[[sym.Fit("sin", 3.0, 0.5, 2.0, 0.1, 1.0), sym.Fit("x^2", 1.0, 0.0, 1.0, 0.0, 1.0)]],
          [[sym.Fit("exp", 1.0, 0.0, 1.0, 0.0, 1.0)]]]
  (expr,) = sym.formula(fits, digits=15)
  x = np.random.default_rng(0).uniform(-1, 1, (20, 2))
  f = sp.lambdify(sp.symbols("x_1 x_2"), expr, "numpy")
  np.testing.assert_allclose(f(x[:, 0], x[:, 1]), sym.evaluate(fits, x)[:, 0], rtol=1e-10)
  noisy = [[[dataclasses.replace(fits[0][0][1], a=7.149, b=1.6e-17, c=0.01957, d=-3e-16)]]]
  smallest = lambda expr: min(abs(float(a)) for a in expr.atoms(sp.Float))
  assert smallest(sym.formula(noisy)[0]) < 1e-15
  assert smallest(sym.formula(noisy, zero_below=1e-8)[0]) > 1e-2  # the shifts' noise dropped


@pytest.mark.slow  # the slow tier: a long training run
def test_trained_kan_becomes_the_right_formula():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (400, 2)), jnp.float32)
  y = jnp.exp(jnp.sin(jnp.pi * x[:, :1]) + x[:, 1:] ** 2)
  model = KAN((2, 1, 1), grid_size=5)
  variables, _ = fit(model, init_variables(model, jax.random.key(0)), x, y, 150,
                     update_grid_every=5, update_grid_until=50)
  fits = sym.auto_symbolic(model, variables, x[:200], names=("x", "x^2", "exp", "sin"))
  assert [e.name for e in fits[0][0]] == ["sin", "x^2"] and fits[1][0][0].name == "exp"
  fits, mse = sym.fit_affine(fits, np.asarray(x), np.asarray(y), steps=100)
  assert np.sqrt(mse) < 1e-2
  (expr,) = sym.formula(fits)
  assert expr.has(sp.exp) and expr.has(sp.sin)

"""Optimizer state carried across a KAN refine: continuing from a returned state equals one run,
the refit matrix reproduces the refit, and the mapped L-BFGS and Adam states are consistent
with the new coefficients (s.y kept, second moments non-negative, shapes of the new model)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtricks.errors import ConfigError
from jaxtricks.models.kan import KAN, init_variables, refine
from jaxtricks.ops import kan
from jaxtricks.train.kan_fit import fit
from jaxtricks.train.kan_state import carry_opt_state, dual_matrices, refine_with_opt_state

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.uniform(-1, 1, (128, 2)), jnp.float32)
Y = jnp.exp(jnp.sin(jnp.pi * X[:, :1]) + X[:, 1:] ** 2)
MODEL = KAN((2, 2, 1), grid_size=3)
STEPS = 6


@pytest.fixture(scope="module", params=["adam", "lbfgs"])
def trained(request):
  """(optimizer, variables, state after STEPS, losses of 2 * STEPS steps in one run)."""
  variables = init_variables(MODEL, jax.random.key(0))
  kw = dict(optimizer=request.param, lr=1e-2)
  _, whole = fit(MODEL, variables, X, Y, 2 * STEPS, **kw)
  variables, _, state = fit(MODEL, variables, X, Y, STEPS, return_state=True, **kw)
  return request.param, variables, state, whole


def test_continuing_from_the_returned_state_equals_one_run(trained):
  optimizer, variables, state, whole = trained
  _, rest = fit(MODEL, variables, X, Y, STEPS, optimizer=optimizer, lr=1e-2, opt_state=state)
  chex.assert_trees_all_close(rest, whole[STEPS:], rtol=1e-6)


def test_refit_matrix_reproduces_the_refit(trained):
  _, variables, _, _ = trained
  new_model, new_vars = refine(MODEL, variables, X, grid_size=7)
  old, new = variables["grid"]["layer_0"]["knots"], new_vars["grid"]["layer_0"]["knots"]
  m = kan.refit_matrix(X, old, new, MODEL.order)
  chex.assert_shape(m, (2, 7 + 3, 3 + 3))
  coef = jnp.einsum("IKJ,IOJ->IOK", m, variables["params"]["layer_0"]["coef"])
  chex.assert_trees_all_close(coef, new_vars["params"]["layer_0"]["coef"], rtol=1e-4, atol=1e-5)
  exact = dual_matrices(m, damping=0.0)  # M^T P = I: pairings s.y are kept
  chex.assert_trees_all_close(jnp.einsum("IKJ,IKL->IJL", m, exact),
                              np.broadcast_to(np.eye(6), (2, 6, 6)), rtol=1e-7, atol=1e-3)
  m64 = np.asarray(m, np.float64)
  for i in range(2):  # the damped map against numpy
    mtm = m64[i].T @ m64[i]
    ref = m64[i] @ np.linalg.inv(mtm + 1e-2 * np.linalg.eigvalsh(mtm)[-1] * np.eye(6))
    chex.assert_trees_all_close(dual_matrices(m)[i], ref, rtol=1e-3, atol=1e-5)


def _pairing(a: dict, b: dict) -> jnp.ndarray:
  """sum over all parameters of a * b, per leading (memory) index."""
  return sum(jnp.sum(x * y, axis=tuple(range(1, x.ndim)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_mapped_state_matches_the_new_model(trained):
  optimizer, variables, state, _ = trained
  new_model, new_vars, new_state = refine_with_opt_state(MODEL, variables, X, state, grid_size=10)
  fresh = optax.lbfgs(memory_size=10) if optimizer == "lbfgs" else optax.adam(1e-2)
  chex.assert_trees_all_equal_shapes(new_state, fresh.init(new_vars["params"]))
  if optimizer == "adam":
    adam, old_adam = new_state[0], state[0]
    assert int(adam.count) == STEPS
    assert all(bool(jnp.all(leaf >= 0)) for leaf in jax.tree.leaves(adam.nu))
    chex.assert_trees_all_close(adam.mu["layer_0"]["w_base"], old_adam.mu["layer_0"]["w_base"],
                                rtol=1e-7)
  else:
    lbfgs, search = new_state[0], new_state[2]
    chex.assert_trees_all_close(  # s'.y' = s.y up to the damping of the dual map
        _pairing(lbfgs.diff_params_memory, lbfgs.diff_updates_memory),
        _pairing(state[0].diff_params_memory, state[0].diff_updates_memory), rtol=3e-2,
        atol=1e-6)
    chex.assert_trees_all_close(lbfgs.weights_memory, state[0].weights_memory, rtol=1e-7)
    assert bool(jnp.isinf(search.value))  # the next step evaluates the refitted network
  _, losses = fit(new_model, new_vars, X, Y, 3, optimizer=optimizer, lr=1e-2,
                  opt_state=new_state)
  chex.assert_tree_all_finite(losses)


def test_other_optimizer_states_are_refused(trained):
  _, variables, _, _ = trained
  state = optax.sgd(1e-2, momentum=0.9).init(variables["params"])
  with pytest.raises(ConfigError, match="cannot carry optimizer state TraceState"):
    refine_with_opt_state(MODEL, variables, X, state, grid_size=5)


def test_fit_carries_the_state_across_its_grid_updates():
  variables = init_variables(MODEL, jax.random.key(1))
  _, losses, state = fit(MODEL, variables, X, Y, 4, optimizer="adam", update_grid_every=2,
                         update_grid_until=4, carry_state=True, return_state=True)
  chex.assert_shape(losses, (4,))
  assert int(state[0].count) == 4  # one Adam run across the update
  _, _, restarted = fit(MODEL, variables, X, Y, 4, optimizer="adam", update_grid_every=2,
                        update_grid_until=4, return_state=True)
  assert int(restarted[0].count) == 2  # a fresh Adam after the update at step 2
  with pytest.raises(ConfigError):
    carry_opt_state(optax.sgd(1e-2, momentum=0.9).init(variables["params"]), {}, {})

"""The pure train step `step(state, batch) -> (state, metrics)` and the eval step, jitted with
shardings and buffer donation, and traced with their mesh set (`jax.set_mesh`) so that per-device
code inside (jax.shard_map: the vocabulary-parallel loss, ring attention) finds its mesh axes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtricks import sharding
from jaxtricks.train.collections import bind_collections, updated_collections
from jaxtricks.train.state import TrainState


def model_rngs(model, rng: jax.Array) -> dict[str, jax.Array]:
  """One key per PRNG stream the model's components draw from in training (Flax `rngs`)."""
  return {name: jax.random.fold_in(rng, i) for i, name in enumerate(model.config.rng_streams)}


def make_train_step(model, tx: optax.GradientTransformation, loss_fn: Callable,
                    schedule: optax.Schedule, skip_nonfinite: bool = False) -> Callable:
  """The loss runs with `train=True` and a key per PRNG stream, from the state's key and the step.
  With `skip_nonfinite`, a step whose loss or gradient norm is not finite keeps the old
  parameters and optimizer state (decided on device: no host sync); only the step advances, and
  metrics['skipped'] is 1. Variable collections besides `params` (BatchNorm statistics) are
  read and updated by the forward pass (jaxtricks.train.collections)."""
  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rngs = model_rngs(model, jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
    # Gradients of the trainable parameters only; frozen ones enter as constants.
    def loss(params):
      bound = bind_collections(model, state.model_collections(), update=True)
      value, metrics = loss_fn(bound, state.replace(params=params).model_params(), batch, True,
                               rngs)
      return value, (metrics, updated_collections(bound))
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (_, (metrics, collections)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step))
    if skip_nonfinite:
      ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      collections = keep(collections, state.model_collections())
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    new_state = new_state.with_collections(collections)
    return new_state, metrics
  return step


def make_eval_step(model, loss_fn: Callable) -> Callable:
  """Evaluation of all the model's parameters (`state.model_params()`) and its other variable
  collections (`state.model_collections()`, read only): `train=False`, no PRNG streams
  (deterministic)."""
  def step(params: Any, batch: dict, collections: dict) -> dict:
    _, metrics = loss_fn(bind_collections(model, collections, update=False), params, batch,
                         False, None)
    return metrics
  return step


def in_mesh(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`fn` called (and so traced) with `mesh` as the current mesh."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def jit_train_step(step: Callable, shardings: Any, mesh: jax.sharding.Mesh) -> Callable:
  data = sharding.batch_sharding(mesh)
  return in_mesh(jax.jit(step, in_shardings=(shardings, data),
                         out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0),
                 mesh)


def jit_eval_step(step: Callable, shardings: Any, mesh: jax.sharding.Mesh) -> Callable:
  """`eval_step(params, batch, collections=None)`; collections may be left out only by a model
  that has none."""
  in_shardings = (shardings.model_params(), sharding.batch_sharding(mesh),
                  shardings.model_collections())
  jitted = in_mesh(jax.jit(step, in_shardings=in_shardings,
                           out_shardings=sharding.replicated(mesh)), mesh)
  needed = sorted(shardings.model_collections())

  def call(params: Any, batch: dict, collections: dict | None = None) -> dict:
    if collections is None:
      if needed:
        raise ValueError(f"this model keeps the variable collections {', '.join(needed)}: "
                         f"evaluate with eval_step(params, batch, state.model_collections())")
      collections = {}
    return jitted(params, batch, collections)
  return call


def mean_metrics(metrics: list[dict]) -> dict[str, float]:
  return {k: float(jnp.mean(jnp.stack([m[k] for m in metrics]))) for k in metrics[0]}

"""`build(config, mesh)`: everything a run trains with, made the one way the loop and the
benchmarks share: the model, its optimizer and schedule, the loss, the jitted and sharded train
and eval steps, the state's abstract shape and shardings, and its initialiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxtricks import sharding
from jaxtricks.config import Config
from jaxtricks.errors import ConfigError
from jaxtricks.models.transformer import Transformer
from jaxtricks.train import step as step_lib
from jaxtricks.train.losses import LOSSES
from jaxtricks.train.optimizer import lr_schedule, make_optimizer
from jaxtricks.train.state import TrainState, init_state, state_shardings


@dataclasses.dataclass
class Built:
  config: Config
  mesh: jax.sharding.Mesh
  model: Transformer
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss_fn: Callable
  abstract_state: Any            # unboxed ShapeDtypeStructs of the TrainState
  shardings: Any                 # NamedShardings of the TrainState
  train_step: Callable           # jitted (state, batch) -> (state, metrics), state donated
  eval_step: Callable            # jitted (params, batch) -> metrics

  def init_state(self, seed: int | None = None) -> TrainState:
    """A fresh state, initialised directly into its sharded layout."""
    tc = self.config.train
    return init_state(self.model, self.tx, tc.seq_len, tc.seed if seed is None else seed,
                      self.shardings)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)


def build(config: Config, mesh: jax.sharding.Mesh | None = None) -> Built:
  """Builds the run of `config` (validated) on `mesh` (default: `config.mesh`'s)."""
  config.validate()
  tc = config.train
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  if tc.batch_size % dp:
    raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the data-parallel "
                      f"size {dp} (mesh.data * mesh.fsdp)")
  model = Transformer(config.model)
  tx = make_optimizer(tc, model)
  schedule = lr_schedule(tc)
  loss_fn = LOSSES[tc.loss]
  abstract, shardings = state_shardings(model, tx, tc.seq_len, mesh)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, loss_fn, schedule, tc.skip_nonfinite), shardings, mesh)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model, loss_fn), shardings, mesh)
  return Built(config, mesh, model, tx, schedule, loss_fn, abstract, shardings, train_step,
               eval_step)

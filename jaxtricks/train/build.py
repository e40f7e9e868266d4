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
from jaxtricks.train.hooks import with_contexts
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
  eval_step: Callable            # jitted (params, batch, collections=None) -> metrics

  def init_state(self, seed: int | None = None, loaded: dict | None = None) -> TrainState:
    """A fresh state, initialised directly into its sharded layout; the parameters in `loaded`
    (pretrained ones, jaxtricks.train.init_from) replace their fresh draws."""
    tc = self.config.train
    return init_state(self.model, self.tx, tc.seq_len, tc.seed if seed is None else seed,
                      self.shardings, loaded)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)


def check_mesh_fits_model(config: Config, mesh: jax.sharding.Mesh) -> None:
  """The mesh axes that split the model must divide what they split."""
  tensor, context = mesh.shape["tensor"], mesh.shape["context"]
  vocab = config.model.vocab_size
  if vocab % tensor:
    padded = -(-vocab // tensor) * tensor
    raise ConfigError(f"mesh.tensor={tensor} does not divide the vocabulary "
                      f"(model.vocab_size={vocab}); pad the vocabulary to a multiple of {tensor}, "
                      f"e.g. --model.vocab_size={padded}")
  if config.train.seq_len % context:
    raise ConfigError(f"mesh.context={context} does not divide the sequence length "
                      f"(train.seq_len={config.train.seq_len})")


def build(config: Config, mesh: jax.sharding.Mesh | None = None) -> Built:
  """Builds the run of `config` (validated) on `mesh` (default: `config.mesh`'s)."""
  config.validate()
  tc = config.train
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  if tc.batch_size % dp:
    raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the data-parallel "
                      f"size {dp} (mesh.data * mesh.fsdp)")
  check_mesh_fits_model(config, mesh)
  model = Transformer(config.model)
  tx = make_optimizer(tc, model)
  schedule = lr_schedule(tc)
  loss_fn = with_contexts(LOSSES[tc.loss])
  abstract, shardings = state_shardings(model, tx, tc.seq_len, mesh)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, loss_fn, schedule, tc.skip_nonfinite), shardings, mesh)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model, loss_fn), shardings, mesh)
  return Built(config, mesh, model, tx, schedule, loss_fn, abstract, shardings, train_step,
               eval_step)

"""Starting a run from another run's parameters (`--init_from=WORKDIR`): fine-tuning.

The source is any jaxtricks LM workdir (config.json and checkpoints/). Its newest checkpoint's
parameters are restored with orbax straight into the current mesh's shardings (no optimizer
state is read) and placed into the new model; the source is only read: no file in it is
created, renamed or removed, so it may even be training still.

The two models must be the same pretrained model: their configs are compared after each
component is replaced by its `base()` (a LoRA projection by the dense one it adapts, NEFTune by
the token embedding), and a difference is a one-line error naming the fields. When the projection
kinds differ (a dense or SLoPe source, a LoRA target) the source's parameters are first merged into
plain weights (`jaxtricks.models.merge`), then the target's projection adopts them (SPP checks
their N:M sparsity). Parameters that the target has and the source does not (the adapters) keep
their fresh initialisation (`Built.init_state(loaded=...)`, one compiled initialisation); the
optimizer state starts afresh from the loaded parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxtricks.config import Config, as_flat_json, changed_keys, from_dict
from jaxtricks.errors import ConfigError, UserError
from jaxtricks.models import merge
from jaxtricks.models.config import ModelConfig
from jaxtricks.models.transformer import Transformer
from jaxtricks.registry import SLOTS
from jaxtricks.train.state import FrozenBaseState, merge_trees, state_shardings

CHECKPOINTS = "checkpoints"


class InitFromError(ConfigError):
  """--init_from names no usable pretrained run."""


@dataclasses.dataclass(frozen=True)
class Source:
  directory: str
  model: ModelConfig
  exp: str
  step: int

  @property
  def state_path(self) -> str:
    return os.path.join(self.directory, CHECKPOINTS, str(self.step), "state")


def _finished_steps(directory: str) -> list[int]:
  folder = os.path.join(directory, CHECKPOINTS)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder)
                if name.isdigit() and os.path.isdir(os.path.join(folder, name, "state")))


def read_source(directory: str) -> Source:
  """The pretrained run in `directory`, or an InitFromError saying why it is none."""
  where = f"--init_from={directory}"
  if not os.path.isdir(directory):
    raise InitFromError(f"{where}: no such directory")
  path = os.path.join(directory, "config.json")
  variants = os.path.join(directory, "variants")
  if not os.path.exists(path):
    raise InitFromError(f"{where} is not a jaxtricks run (no config.json); point it at the "
                        "--workdir of a language-model run")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise InitFromError(f"{where}: config.json cannot be read ({e})") from None
  exp = str(saved.get("exp", "?"))
  if exp == "kan":
    raise InitFromError(f"{where} is a KAN run (--exp=kan), not a language model; --init_from "
                        "needs a language-model run (e.g. --exp=lm)")
  steps = _finished_steps(directory)
  if not steps and os.path.isdir(variants):
    runs = sorted(root for root, dirs, _ in os.walk(variants) if CHECKPOINTS in dirs)
    raise InitFromError(f"{where} holds the variants of --exp={exp}, not one run; point it at "
                        f"one of them, e.g. {runs[0]}" if runs else
                        f"{where} holds no finished variant of --exp={exp}")
  if not isinstance(saved.get("model"), dict) or not isinstance(
      saved["model"].get("attention"), dict):
    raise InitFromError(f"{where}: config.json holds no language model of this jaxtricks "
                        "version (no model with components)")
  if not steps:
    raise InitFromError(f"{where} has no finished checkpoint in {CHECKPOINTS}/ (was the run "
                        "stopped before its first save?)")
  try:
    model = from_dict(Config(), saved["model"], "model.").model
  except ConfigError as e:
    raise InitFromError(f"{where}: its model config cannot be read here ({e})") from None
  return Source(directory, model, exp, steps[-1])


def base_config(model: ModelConfig) -> ModelConfig:
  """`model` with every component replaced by its base (what its pretrained parameters are)."""
  return dataclasses.replace(model, **{slot: getattr(model, slot).base() for slot in SLOTS})


def check_same_model(source: Source, model: ModelConfig) -> None:
  """A one-line InitFromError naming every field in which the two base models differ."""
  saved, current = as_flat_json(base_config(source.model)), as_flat_json(base_config(model))
  diff = changed_keys(saved, current)
  if diff:
    changes = ", ".join(f"model.{k}: {saved.get(k)!r} there, {current.get(k)!r} here"
                        for k in diff)
    raise InitFromError(f"--init_from={source.directory} holds another model ({changes}); "
                        "fine-tuning keeps the pretrained model's config")


def check(config: Config, workdir: str) -> Source:
  """The source of `config.train.init_from`, checked against the run's model and workdir."""
  directory = config.train.init_from
  if os.path.abspath(directory) == os.path.abspath(workdir):
    raise InitFromError(f"--init_from={directory} is the run's own --workdir; a fine-tuning run "
                        "needs a workdir of its own (the source is never written)")
  source = read_source(directory)
  check_same_model(source, config.model)
  return source


def _restore_params(source: Source, mesh: jax.sharding.Mesh) -> dict:
  """The source's parameters at its newest step, restored into its model's shardings on `mesh`
  (the trained and, for a fine-tuned source, the frozen ones, as one tree)."""
  model = Transformer(source.model)
  abstract, shardings = state_shardings(model, optax.identity(), 8, mesh)
  wanted = {"params": abstract.params}
  where = {"params": shardings.params}
  if isinstance(abstract, FrozenBaseState):
    wanted["frozen"], where["frozen"] = abstract.frozen, shardings.frozen
  args = jax.tree.map(lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape,
                                                        dtype=a.dtype), wanted, where)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(source.state_path, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=args, partial_restore=True))
  except Exception as e:  # noqa: BLE001 (a damaged or foreign checkpoint)
    first = str(e).strip().splitlines()[0][:200] if str(e) else type(e).__name__
    raise UserError(f"--init_from={source.directory}: step {source.step} cannot be read "
                    f"({first})") from None
  finally:
    checkpointer.close()
  return merge_trees(restored["params"], restored.get("frozen", {}))


def load(source: Source, built: Any) -> dict:
  """The source's parameters as the run of `built` takes them (`built.init_state(loaded=...)`:
  parameters it lacks, the adapters, keep their fresh draws; the optimizer state starts from
  the loaded ones)."""
  target = built.config.model
  params = _restore_params(source, built.mesh)
  if source.model.projection != target.projection:
    _, params = merge.merged_params(source.model, params, slots=("projection",))
  wanted = traverse_util.flatten_dict(built.abstract_state.model_params())
  for path, value in traverse_util.flatten_dict(params).items():
    if path not in wanted:
      raise InitFromError(f"--init_from={source.directory}: parameter {'/'.join(path)} has no "
                          "place in this model")
    if value.shape != wanted[path].shape:
      raise InitFromError(f"--init_from={source.directory}: parameter {'/'.join(path)} has "
                          f"shape {value.shape} there and {wanted[path].shape} here")
  return target.projection.adopt(target, params)

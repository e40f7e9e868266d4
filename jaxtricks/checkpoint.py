"""Checkpoints through orbax (the only module that imports it).

A checkpoint holds the whole train state (parameters, optimizer state, step, PRNG key) and a JSON
record of the data position, the seed and the model config, so that a resumed run continues
exactly where it stopped.

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete,
so a save interrupted by SIGKILL leaves only a temporary folder, which is reported and removed. A
finished step that cannot be read back (files missing or damaged) is set aside as
`<step>.corrupt` with a warning naming it, and the newest readable one is restored instead.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxtricks.errors import UserError

TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._warn_unfinished()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _warn_unfinished(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if TMP_MARKER in name:
        logging.warning("skipping the unfinished checkpoint %s (its save was interrupted); "
                        "removing it", os.path.join(self.directory, name))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest readable checkpoint, or None if there is none.

    Damaged newer steps are set aside (renamed, not deleted) with a warning naming each; if no
    step can be read at all, nothing is renamed and a UserError names the newest one's error.
    """
    steps = sorted(self.all_steps(), reverse=True)
    bad: list[tuple[int, str]] = []
    for step in steps:
      self.check_param_shapes(step, abstract_state)
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 (any failure to read back means a damaged step)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
        bad.append((step, reason))
        logging.warning("checkpoint %s is incomplete or corrupted (%s); trying the previous one",
                        self.step_path(step), reason)
        continue
      if bad:
        self._set_aside([s for s, _ in bad])
      return step, state, meta
    if bad:
      raise UserError(f"no checkpoint in {self.directory} can be restored (newest: step "
                      f"{bad[0][0]}, {bad[0][1]}); move the folder away to start afresh")
    return None

  def check_param_shapes(self, step: int, abstract_state: Any) -> None:
    """Refuses a step whose saved parameters have other shapes than the model's (another
    model, not another topology: shardings may differ freely). Unreadable metadata passes: the
    restore then reports the damage."""
    handler = ocp.StandardCheckpointHandler()
    try:
      saved = _shapes(handler.metadata(epath.Path(self.step_path(step)) / "state")["params"])
    except Exception:  # noqa: BLE001 (damaged metadata: left to restore_latest)
      return
    finally:
      handler.close()
    wanted = _shapes(abstract_state.params)
    diff = [f"{k} {saved.get(k, 'absent')} in the checkpoint, {wanted.get(k, 'absent')} here"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if diff:
      more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
      raise UserError(f"checkpoint step {step} in {self.directory} holds parameters of other "
                      f"shapes than this model: {diff[0]}{more}; a different model, not a "
                      "topology change: use another --workdir or delete it")

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        target = f"{self.step_path(step)}{CORRUPT_SUFFIX}"
        if os.path.exists(target):
          target = f"{target}-{int(time.time())}"
        os.replace(self.step_path(step), target)
        logging.warning("skipped checkpoint step %d: moved to %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxtricks_set_aside_checkpoints")
    self._manager.reload()

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def read_numpy(directory: str, step: int) -> Any:
  """The train state saved at `step` as nested dicts of numpy arrays, on one host, whatever the
  mesh that wrote it (for comparing runs)."""
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def save_tree(path: str, tree: Any) -> None:
  """Writes a pytree of arrays (e.g. compressed inference parameters) to the folder `path`,
  replacing it; orbax writes under a temporary name and renames it when complete."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), tree, force=True)


def load_tree(path: str, like: Any) -> Any:
  """Reads what save_tree wrote into the structure of `like` (arrays or ShapeDtypeStructs; custom
  pytree nodes such as NMCompressed are rebuilt from it)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(path), abstract)

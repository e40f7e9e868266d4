"""The train state (step, params, optimizer state, PRNG key) and its sharded initialisation.

Variable collections other than `params` that the model's components declare
(`Component.collections`, e.g. BatchNorm statistics: jaxtricks.train.collections) are held in
`collections` by the state classes that have them (`CollectionsState`, `FrozenCollectionsState`);
`model_collections()` is {} otherwise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxtricks import sharding


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key, so that checkpoints hold plain arrays

  def model_params(self) -> Any:
    """Every parameter of the model (what `model.apply` takes)."""
    return self.params

  def model_collections(self) -> dict:
    """The model's variable collections besides `params` ({} for most models)."""
    return {}

  def with_collections(self, collections: dict) -> TrainState:
    del collections
    return self


@flax.struct.dataclass
class FrozenBaseState(TrainState):
  """A state whose model has parameters that do not train: `params` are the trainable ones."""
  frozen: Any

  def model_params(self) -> Any:
    return merge_trees(self.params, self.frozen)


class _HoldsCollections:
  """The collection accessors of the states below (their `collections` field)."""

  def model_collections(self) -> dict:
    return self.collections

  def with_collections(self, collections: dict) -> TrainState:
    return self.replace(collections=collections)


@flax.struct.dataclass
class CollectionsState(_HoldsCollections, TrainState):
  """A state whose model keeps variable collections besides `params`."""
  collections: Any


@flax.struct.dataclass
class FrozenCollectionsState(_HoldsCollections, FrozenBaseState):
  """Frozen parameters and variable collections."""
  collections: Any


def split_trainable(model_config: Any, params: dict) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts of `params` by `model_config.trains(path)`."""
  parts: tuple[dict, dict] = ({}, {})
  for path, value in traverse_util.flatten_dict(params).items():
    parts[not model_config.trains(path)][path] = value
  return tuple(traverse_util.unflatten_dict(p) for p in parts)


def merge_trees(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a),
                                       **traverse_util.flatten_dict(b)})


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  def init(rng: jnp.ndarray, loaded: dict | None = None) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(init_rng, tokens)  # boxed with logical axis names
    params = variables["params"]
    variables = {name: variables[name] for name in model.config.collections if name in variables}
    if loaded:
      params = _overwrite(params, loaded)
    params, frozen = split_trainable(model.config, params)
    parts = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                 rng=state_rng)
    if variables:
      parts["collections"] = variables
      return FrozenCollectionsState(**parts, frozen=frozen) if frozen else CollectionsState(**parts)
    return FrozenBaseState(**parts, frozen=frozen) if frozen else TrainState(**parts)
  return init


def _overwrite(boxed: dict, values: dict) -> dict:
  """`boxed` parameters with the values of `values` where it has them (boxes kept)."""
  flat = traverse_util.flatten_dict(boxed)
  for path, value in traverse_util.flatten_dict(values).items():
    old = flat[path]
    flat[path] = old.replace_boxed(value) if isinstance(old, nn.meta.AxisMetadata) else value
  return traverse_util.unflatten_dict(flat)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                    mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES) -> tuple[Any, Any]:
  """(abstract unboxed state, NamedSharding tree): parameters and their Adam moments are sharded
  by the parameters' logical axis names, everything else replicated."""
  boxed = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.key_data(jax.random.key(0)))
  logical = nn.get_partition_spec(boxed)
  abstract = nn.unbox(boxed)
  return abstract, sharding.tree_shardings(logical, abstract, mesh, rules)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, seed: int,
               shardings: Any, loaded: dict | None = None) -> TrainState:
  """Initialises directly into the sharded layout (no full copy on one device); parameters in
  `loaded` (a subtree of the model's, e.g. pretrained weights) replace their fresh draws."""
  init = _init_fn(model, tx, seq_len)
  rng = jax.random.key_data(jax.random.key(seed))
  return jax.jit(lambda r, p: nn.unbox(init(r, p)), out_shardings=shardings)(rng, loaded)


def count_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))

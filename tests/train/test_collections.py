"""The seams for norm kinds and for variable collections besides `params`: every norm site is
built by the `norm` component; the train step carries a model's collections (read, updated by
the forward pass, kept on a skipped step), the eval step reads them, and a model without any is
untouched."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks import sharding
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.norm import RMSNorm, RMSNormConfig
from jaxtricks.layers.prepbn import STATS, PRepBNConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train import step as step_lib
from jaxtricks.train.collections import bind_collections, updated_collections
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.losses import LOSSES
from jaxtricks.train.optimizer import lr_schedule, make_optimizer
from jaxtricks.train.state import CollectionsState, TrainState, init_state, state_shardings

SEQ, BATCH = 8, 2
TINY = ModelConfig(d_model=16, n_layers=2, attention=AttentionConfig(n_heads=2, kv_sharing=2))
BUILT_SITES: list = []


class Doubled(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return 2.0 * RMSNorm(name="inner")(x, train=train)


@dataclasses.dataclass(frozen=True)
class RecordingNorm(RMSNormConfig):
  """The rms kind with every site recorded and its output doubled."""

  def build(self, model, name=None):
    BUILT_SITES.append(name)
    return Doubled(name=name)


def test_every_norm_site_is_built_by_the_norm_component():
  tokens = jnp.zeros((1, SEQ), jnp.int32)
  BUILT_SITES.clear()
  params = Transformer(dataclasses.replace(TINY, norm=RecordingNorm())).init(
      jax.random.key(0), tokens)["params"]
  # CLA2: layer 0 produces K/V for layer 1 and has a K/V norm; None is the final norm (setup)
  assert sorted(map(str, set(BUILT_SITES))) == ["None", "attn_norm", "kv_norm", "mlp_norm"]
  assert set(params["block_0"]["attn_norm"]) == {"inner"}
  assert "kv_norm" in params["block_0"] and "kv_norm" not in params["block_1"]
  assert set(params["final_norm"]) == {"inner"}


def batch_of(seed: int) -> dict:
  tokens = np.random.default_rng(seed).integers(0, 256, (BATCH, SEQ + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def stepper(config: ModelConfig, loss_fn, skip_nonfinite: bool = False):
  train = TrainConfig(steps=10, batch_size=BATCH, seq_len=SEQ, warmup_steps=0)
  mesh = sharding.make_mesh(sharding.MeshConfig())
  model, tx = Transformer(config), make_optimizer(train)
  _, shardings = state_shardings(model, tx, SEQ, mesh)
  step = step_lib.jit_train_step(step_lib.make_train_step(model, tx, loss_fn, lr_schedule(train),
                                                          skip_nonfinite), shardings, mesh)
  return model, step, init_state(model, tx, SEQ, 0, shardings)


def nan_on_odd_steps(model, params, batch, train, rngs):
  loss, metrics = LOSSES["lm"](model, params, batch, train, rngs)
  bad = batch["inputs"][0, 0] % 2 == 1
  loss = jnp.where(bad, jnp.nan, loss)
  return loss, {**metrics, "loss": loss}


def test_the_train_step_carries_collections_and_keeps_them_on_a_skipped_step():
  config = dataclasses.replace(TINY, norm=PRepBNConfig(warm=0, steps=4))
  model, step, state = stepper(config, nan_on_odd_steps, skip_nonfinite=True)
  assert isinstance(state, CollectionsState)
  good = batch_of(0)
  good["inputs"] = good["inputs"].at[0, 0].set(2)
  bad = {**good, "inputs": good["inputs"].at[0, 0].set(3)}
  initial = jax.device_get(state)  # the step donates its input state
  state, metrics = step(state, good)
  after_good = jax.device_get(state.model_collections())
  assert int(after_good[STATS]["final_norm"]["count"]) == 1 and metrics["skipped"] == 0
  # the statistics the step keeps are those of the loss's training forward pass
  bound = bind_collections(model, initial.model_collections(), update=True)
  LOSSES["lm"](bound, initial.model_params(), good, True, {})
  chex.assert_trees_all_close(updated_collections(bound), after_good, atol=1e-6)
  state, metrics = step(state, bad)
  assert metrics["skipped"] == 1
  chex.assert_trees_all_equal(jax.device_get(state.model_collections()), after_good)


def test_a_model_without_collections_is_passed_through():
  model = Transformer(TINY)
  assert bind_collections(model, {}, update=True) is model
  assert updated_collections(model) == {}
  _, _, state = stepper(TINY, LOSSES["lm"])
  assert type(state) is TrainState and state.model_collections() == {}

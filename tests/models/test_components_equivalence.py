"""Each model component gives what the code before the components refactor gave, on the same
parameters: logits, loss, gradients, one optimizer update, decode-cache shapes
(tests/fixtures/components.npz, written by tests/fixtures/make_components_fixture.py). One
change since: sequential modules draft, so their cases also cache mtp_1 (cases.json)."""

from __future__ import annotations

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxtricks.decode import init_cache
from jaxtricks.models.transformer import Transformer
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.optimizer import make_optimizer
from tests import support
from tests.fixtures import make_components_fixture as fixture

CASES = json.loads((support.REPO / "tests" / "fixtures" / "cases.json").read_text())
ARRAYS = np.load(support.REPO / "tests" / "fixtures" / "components.npz")


def stored(prefix: str) -> dict:
  return {tuple(k[len(prefix) + 1:].split("/")): ARRAYS[k] for k in ARRAYS.files
          if k.startswith(prefix + "/")}


@pytest.mark.parametrize("name", sorted(CASES["cases"]))
def test_component_matches_the_stored_reference(name):
  case = CASES["cases"][name]
  cfg = fixture.model_config(case["fields"])
  cfg.validate()
  model = Transformer(cfg)
  b, t = CASES["batch"]
  shapes = traverse_util.flatten_dict(nn.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, t), jnp.int32))["params"]))
  params_flat = stored(f"{name}/params")
  chex.assert_trees_all_equal_shapes(params_flat, shapes)
  params = traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in params_flat.items()})
  batch = fixture.case_inputs(cfg.vocab_size)
  train = TrainConfig(**CASES["train"])
  out = fixture.compute(model, params, batch, case["loss"], make_optimizer(train, model))
  chex.assert_trees_all_close(out["logits"], ARRAYS[f"{name}/logits"], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(out["loss"], ARRAYS[f"{name}/loss"], rtol=1e-6)
  for what in ("grads", "updates"):
    expected = stored(f"{name}/{what}")
    got = {p: fixture.sketch(v) for p, v in traverse_util.flatten_dict(out[what]).items()}
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-6, custom_message=what)
  cache = init_cache(cfg, b, 16, cfg.mtp.heads)
  assert {k: list(np.shape(v)) for k, v in traverse_util.flatten_dict(cache, sep="/").items()
          } == case["cache"]

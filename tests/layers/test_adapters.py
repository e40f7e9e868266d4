"""The adapter projections (LoRA, MoRA, SPP, SPAFIT, BitFit) against numpy references of their
formulas, their zero start, merging into plain weights, SPP's kept sparsity, what trains, and
their config errors."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxtricks.errors import ConfigError
from jaxtricks.layers.adapter import AdaptedLinear
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.kan import KANMLPConfig
from jaxtricks.layers.lora import LoRAProjection
from jaxtricks.layers.mora import MoRAProjection
from jaxtricks.layers.spafit import BitFitProjection, SPAFITProjection
from jaxtricks.layers.spp import SPPProjection
from jaxtricks.models.merge import merged_params
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops import sparsity
from tests.ops.test_mora import naive_delta
from tests.support import random_params

BASE = ModelConfig(d_model=32, n_layers=3, attention=AttentionConfig(n_heads=2))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
N_IN, N_OUT, ROWS = 16, 24, 5


def _layer(adapter, seed=0, name="q"):
  """(x, W, adapter params, y) of one AdaptedLinear with random (non-zero) adapter values."""
  module = AdaptedLinear((N_OUT,), ("embed", "mlp"), adapter=adapter, layer=2, depth=3,
                         name=name)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((ROWS, N_IN)).astype(np.float32)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  params = {k: rng.standard_normal(v.shape).astype(np.float32) * (0.3 if k != "kernel" else 1)
            for k, v in shapes.items()}
  y = np.asarray(module.apply({"params": params}, x))
  return x, params.pop("kernel"), params, y


def test_lora_formula():
  adapter = LoRAProjection(rank=4, alpha=8.0)
  x, w, p, y = _layer(adapter)
  want = x @ w + (8.0 / 4) * (x @ p["lora_a"]) @ p["lora_b"]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  _, _, _, y_rs = _layer(dataclasses.replace(adapter, rslora=True))
  np.testing.assert_allclose(y_rs, x @ w + (8.0 / 2) * (x @ p["lora_a"]) @ p["lora_b"],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("operator", ["truncation", "sharing", "decoupling", "rotation"])
def test_mora_formula(operator):
  adapter = MoRAProjection(rank=4, operator=operator)
  x, w, p, y = _layer(adapter)
  r_hat = p["mora_m"].shape[0]
  assert r_hat ** 2 <= (N_IN + N_OUT) * 4 < (r_hat + 2) ** 2
  np.testing.assert_allclose(y, x @ w + naive_delta(x, p["mora_m"], N_OUT, operator),
                             rtol=1e-5, atol=1e-5)


def test_spp_formula():
  adapter = SPPProjection(rank=4, scale=2.0)
  x, w, p, y = _layer(adapter)
  a, b = p["spp_a"], p["spp_b"]
  w2 = w.copy()
  for j in range(N_IN):
    for i in range(N_OUT):
      g = i * 4 // N_OUT  # output i's row group
      w2[j, i] = w[j, i] + 2.0 * w[j, i] * a[g, j] * b[i]
  np.testing.assert_allclose(y, x @ w2, rtol=1e-5, atol=1e-5)


def test_spafit_groups():
  adapter = SPAFITProjection(groups=(1, 1, 1), rank=2, alpha=4.0)
  for layer, want in ((0, {"kernel"}), (1, {"kernel", "bias"}),
                      (2, {"kernel", "bias", "lora_a", "lora_b"})):
    module = AdaptedLinear((N_OUT,), ("embed", "mlp"), adapter=adapter, layer=layer, depth=3,
                           name="q")
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, N_IN))))
    shapes = shapes["params"]
    assert set(shapes) == want, layer
  x, w, p, y = _layer(adapter)  # layer 2: LoRA and bias
  np.testing.assert_allclose(y, x @ w + 2.0 * (x @ p["lora_a"]) @ p["lora_b"] + p["bias"],
                             rtol=1e-5, atol=1e-5)
  _, _, p_mlp, _ = _layer(adapter, name="gate")  # not a LoRA target: bias only
  assert set(p_mlp) == {"bias"}


ADAPTERS = [LoRAProjection(rank=4), MoRAProjection(rank=4), SPPProjection(rank=4),
            SPAFITProjection(rank=4), BitFitProjection()]


@pytest.fixture(scope="module", params=ADAPTERS, ids=lambda a: a.kind)
def adapted(request):
  """(config, model, pretrained-like params with the adapters at their init)."""
  config = dataclasses.replace(BASE, projection=request.param)
  config.validate()
  model = Transformer(config)
  init = jax.tree.map(np.asarray, model.init(jax.random.key(1), TOKENS)["params"])
  params = traverse_util.flatten_dict(random_params(model, TOKENS))
  for path, value in traverse_util.flatten_dict(init).items():
    if path[-1] in request.param.param_names:
      params[path] = value  # adapters as initialised; the base random like a pretrained model
  return config, model, traverse_util.unflatten_dict(params)


def test_zero_init_leaves_the_pretrained_outputs(adapted):
  config, model, params = adapted
  plain = {p: v for p, v in traverse_util.flatten_dict(params).items()
           if p[-1] not in config.projection.param_names}
  base = Transformer(dataclasses.replace(config, projection=BASE.projection))
  chex.assert_trees_all_close(model.apply({"params": params}, TOKENS),
                              base.apply({"params": traverse_util.unflatten_dict(plain)}, TOKENS),
                              atol=1e-6)


def test_merged_equals_adapted(adapted):
  config, model, params = adapted
  flat = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(2)
  for path in flat:  # adapters as after some training: small, non-zero
    if path[-1] in config.projection.param_names:
      flat[path] = 0.05 * rng.standard_normal(flat[path].shape).astype(np.float32)
  params = traverse_util.unflatten_dict(flat)
  merged_config, merged = merged_params(config, params)
  assert merged_config.projection.kind == ("bitfit" if config.projection.kind in
                                           ("spafit", "bitfit") else "dense")
  assert not any(p[-1] in ("lora_a", "lora_b", "mora_m", "spp_a", "spp_b")
                 for p in traverse_util.flatten_dict(merged))
  want = model.apply({"params": params}, TOKENS)
  got = Transformer(merged_config).apply({"params": merged}, TOKENS)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_only_adapter_parameters_train(adapted):
  config, _, params = adapted
  trained = {"/".join(p) for p in traverse_util.flatten_dict(params) if config.trains(p)}
  names = config.projection.param_names
  assert trained and all(p.split("/")[-1] in names for p in trained)
  if config.projection.kind == "spafit":  # groups (0, 1, 2) of 3 blocks: block 0 frozen
    assert not any(p.startswith("block_0/") for p in trained)
    assert not any("lora" in p for p in trained if p.startswith("block_1/"))


def test_spp_keeps_n_m_sparsity_when_merged():
  config = dataclasses.replace(BASE, projection=SPPProjection(rank=4, n=2, m=4))
  model = Transformer(config)
  params = traverse_util.flatten_dict(nn.unbox(model.init(jax.random.key(0), TOKENS)["params"]))
  rng = np.random.default_rng(3)
  for path in params:
    if path[-1] in ("spp_a", "spp_b"):
      params[path] = rng.standard_normal(params[path].shape).astype(np.float32)
  _, merged = merged_params(config, traverse_util.unflatten_dict(params))
  kernels = {p: v for p, v in traverse_util.flatten_dict(merged).items()
             if p[-1] == "kernel" and p[-2] in config.projection.targets}
  assert len(kernels) == 3 * 7
  for path, w in kernels.items():
    n_in = w.shape[0] * (w.shape[1] if path[-2] == "o" else 1)
    w_IxO = np.asarray(w).reshape(n_in, -1)
    before = np.asarray(params[path]).reshape(w_IxO.shape)
    assert np.array_equal(w_IxO != 0, before != 0), path
    groups = (w_IxO != 0).reshape(-1, 4, w_IxO.shape[1]).sum(axis=1)
    assert groups.max() <= 2 and np.mean(w_IxO != 0) == 0.5, path
    assert bool(jnp.all(sparsity.nm_mask(jnp.asarray(w_IxO), 2, 4, axis=0) == (w_IxO != 0)))


@pytest.mark.parametrize("projection, message", [
    (LoRAProjection(rank=0), "model.projection.rank=0 must be in 1..32"),
    (LoRAProjection(rank=33), "model.projection.rank=33 must be in 1..32"),
    (MoRAProjection(operator="fold"), "model.projection.operator='fold' is unknown"),
    (SPAFITProjection(groups=(1, 1)), "must be three block counts"),
    (SPAFITProjection(groups=(1, 1, 2)), "adding up to the depth, 3"),
    (LoRAProjection(targets=("q", "qkv")), "must be a non-empty subset"),
    (SPPProjection(m=3), "not divisible by the N:M group size"),
    (BitFitProjection(blocks=(5,)), "no block 5"),
])
def test_bad_adapter_configs(projection, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    dataclasses.replace(BASE, projection=projection).validate()


def test_mlp_targets_on_a_kan_model_are_refused():
  kan = dataclasses.replace(BASE, mlp=KANMLPConfig(d_ff=16),
                            projection=LoRAProjection(targets=("gate", "up")))
  with pytest.raises(ConfigError, match="has none"):
    kan.validate()

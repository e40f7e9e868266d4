"""Multi-token heads on the Transformer: parameters, stripping, causality, compute matching, and
the efficient loss against the naive one through the registered losses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import override
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.mtp import TransformerHeads
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train.losses import LOSSES

BASE = ModelConfig(vocab_size=32, d_model=32, n_layers=2, attention=AttentionConfig(n_heads=4),
                   mtp=TransformerHeads(heads=3))
KINDS = ("transformer", "linear", "sequential")
T = 10


def _init(cfg, seed=0):
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, T)), jnp.int32)
  return model, model.init(jax.random.key(seed), tokens)["params"], tokens


@pytest.fixture(scope="module", params=KINDS)
def built(request):
  return _init(override(BASE, {"mtp": request.param}))


def test_heads_have_their_own_parameters_and_states(built):
  model, params, tokens = built
  assert {"mtp_1", "mtp_2", "block_0", "block_1"} <= set(params)
  h = model.apply({"params": params}, tokens, method="heads_hidden")
  chex.assert_shape(h, (3, 2, T, 32))
  chex.assert_tree_all_finite(h)
  logits = model.apply({"params": params}, h[1], method="project")
  chex.assert_shape(logits, (2, T, 32))
  # Head 1 is the ordinary next-token path.
  chex.assert_trees_all_close(model.apply({"params": params}, h[0], method="project"),
                              model.apply({"params": params}, tokens), rtol=1e-6, atol=1e-6)


def test_stripping_heads_leaves_the_plain_language_model(built):
  model, params, tokens = built
  plain_cfg = override(model.config, {"mtp.heads": 1})
  plain = {k: v for k, v in params.items() if not k.startswith("mtp_")}
  plain_model = Transformer(plain_cfg)
  expected = plain_model.init(jax.random.key(0), tokens)["params"]
  chex.assert_trees_all_equal_structs(expected, plain)
  chex.assert_trees_all_equal(plain_model.apply({"params": plain}, tokens),
                              model.apply({"params": params}, tokens))


def test_heads_are_causal(built):
  # Head i (1-based) at position t may read tokens <= t + i - 1 (sequential modules read the
  # embeddings of the tokens before their targets), never its target t + i or later.
  model, params, tokens = built
  h = model.apply({"params": params}, tokens, method="heads_hidden")
  t = 3
  sequential = model.config.mtp.kind == "sequential"
  for i in range(3):
    last_read = t + i if sequential else t
    changed = tokens.at[:, last_read + 1:].set((tokens[:, last_read + 1:] + 1) % 32)
    h2 = model.apply({"params": params}, changed, method="heads_hidden")
    chex.assert_trees_all_close(h2[i, :, t], h[i, :, t], rtol=1e-6, atol=1e-6)
    seen = tokens.at[:, last_read].set((tokens[:, last_read] + 1) % 32)
    h3 = model.apply({"params": params}, seen, method="heads_hidden")
    assert not np.allclose(h3[i, :, t], h[i, :, t])


@pytest.mark.parametrize("kind", KINDS)
def test_efficient_loss_gradients_equal_naive_through_the_model(kind):
  model, params, tokens = _init(override(BASE, {"mtp": kind, "mtp.loss_lambda": 0.3}), seed=1)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  out = {}
  for name in ("mtp", "mtp_naive"):
    f = lambda p, name=name: LOSSES[name](model, p, batch)
    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    out[name] = loss, grads
    assert set(metrics) >= {"loss", "accuracy", "loss_head1", "loss_head3", "accuracy_head3"}
    chex.assert_trees_all_close(
        loss, metrics["loss_head1"] + 0.15 * (metrics["loss_head2"] + metrics["loss_head3"]),
        rtol=1e-6)
  chex.assert_trees_all_close(out["mtp"][0], out["mtp_naive"][0], rtol=1e-6)
  chex.assert_trees_all_close(out["mtp"][1], out["mtp_naive"][1], rtol=1e-4, atol=1e-6)


def test_one_head_mtp_loss_is_the_lm_loss():
  cfg = override(BASE, {"mtp.heads": 1})
  model, params, tokens = _init(cfg)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  chex.assert_trees_all_close(LOSSES["mtp"](model, params, batch)[0],
                              LOSSES["lm"](model, params, batch)[0], rtol=1e-6)


def test_compute_matched_removes_trunk_layers():
  cfg = override(BASE, {"n_layers": 6, "mtp.heads": 4, "mtp.compute_matched": True})
  assert cfg.depth == 3
  model, params, _ = _init(cfg)
  blocks = [k for k in params if k.startswith("block_")]
  assert len(blocks) == 3 and len([k for k in params if k.startswith("mtp_")]) == 3
  with pytest.raises(ConfigError, match="remove 3 of model.n_layers=3 layers"):
    override(cfg, {"n_layers": 3}).validate()
  with pytest.raises(ConfigError, match="mtp='eagle' is unknown; valid: linear, medusa, "
                                        "sequential, transformer"):
    override(cfg, {"mtp": "eagle"})


def test_compute_matching_alone_is_not_cross_layer_attention():
  """3 layers, 2 heads, compute-matched: 2 trunk blocks, each with its own K/V and no kv_norm
  (the K/V-sharing check once compared producers with n_layers instead of the depth)."""
  cfg = override(BASE, {"n_layers": 3, "mtp.heads": 2, "mtp.compute_matched": True})
  assert cfg.depth == 2 and cfg.kv_producers == (0, 1) and not cfg.cross_layer
  _, params, _ = _init(cfg)
  assert not any("kv_norm" in params[k] for k in params if k.startswith(("block_", "mtp_")))
  shared = override(cfg, {"attention.kv_sharing": 2})
  assert shared.cross_layer
  assert "kv_norm" in _init(shared)[1]["block_0"]

"""Layer linearity (Razzhigaev et al. 2024, arXiv 2405.12250): the score against the paper's
formula, its invariances and limits; block states of a Transformer; linear replacement of a
block; the loader's refusal of a directory that is no LM run."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxtricks import checkpoint
from jaxtricks.analysis import linearity
from jaxtricks.config import Config
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import Block, ModelConfig, Transformer
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.init_from import InitFromError
from jaxtricks.train.loop import train

V, D = 64, 16
# Cross-layer K/V: block 1 attends with block 0's K/V, so a replaced block 0 must still give it.
CONFIG = ModelConfig(vocab_size=V, d_model=D, n_layers=2,
                     attention=AttentionConfig(n_heads=2, kv_sharing=2))


def procrustes_similarity(x, y):
  """The paper's code (LLM_microscope.ipynb): centre, unit Frobenius norm, SVD pseudo-inverse."""
  x = x - x.mean(0)
  y = y - y.mean(0)
  x = x / np.linalg.norm(x)
  y = y / np.linalg.norm(y)
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  a = vt.T @ np.diag(1.0 / s) @ u.T @ y
  return 1.0 - np.linalg.norm(x @ a - y) ** 2


def _data(n=400, d=12, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  return x, rng.normal(size=(d, d)), rng


def test_score_matches_the_papers_formula():
  x, w, rng = _data()
  y = np.tanh(x @ w * 0.5) + 0.3 * x + 0.1 * rng.normal(size=x.shape)
  got = linearity.linearity_score(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  want = procrustes_similarity(np.float32(x).astype(np.float64), np.float32(y).astype(np.float64))
  assert abs(got - want) < 1e-9 and 0.0 < got < 1.0
  want = procrustes_similarity(x, y - x)
  assert abs(linearity.linearity_score_without_residual(x, y) - want) < 1e-9


def test_an_affine_map_scores_one_and_a_saturated_one_much_less():
  x, w, rng = _data()
  b = rng.normal(size=x.shape[1])
  assert abs(linearity.linearity_score(x, x @ w + b) - 1.0) < 1e-9
  assert linearity.linearity_score(x, np.tanh(x @ (20.0 * w))) < 0.7


def test_score_is_invariant_to_shift_and_global_scale():
  x, w, _ = _data()
  y = np.tanh(x @ w)
  base = linearity.linearity_score(x, y)
  assert abs(linearity.linearity_score(3.0 * x + 5.0, 0.01 * y - 2.0) - base) < 1e-9


def test_too_few_tokens_is_an_error():
  x, w, _ = _data(n=13)  # N = D + 1: after centring the fit is exact
  with pytest.raises(ValueError, match="underdetermined with N=13 tokens"):
    linearity.linearity_score(x, np.tanh(x @ w))
  x, w, _ = _data(n=14)
  assert linearity.linearity_score(x, np.tanh(x @ w)) < 1.0


@pytest.fixture(scope="module")
def model_and_params():
  CONFIG.validate()
  model = Transformer(CONFIG)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return model, params["params"]


def _tokens(seed, b=4, t=16):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def test_block_states_are_the_embedding_and_each_blocks_output(model_and_params):
  model, params = model_and_params
  tokens = _tokens(1, 2, 8)
  states = linearity.block_states(model, params, tokens)
  chex.assert_shape(states, (3, 16, D))
  chex.assert_tree_all_finite(states)
  np.testing.assert_array_equal(states[0], np.asarray(params["embed"]["embedding"])[
      np.asarray(tokens).reshape(-1)])
  x0 = jnp.asarray(states[0]).reshape(2, 8, D)
  x1, kv, _ = Block(CONFIG, 0).apply({"params": params["block_0"]}, x0, None)
  x2, _, _ = Block(CONFIG, 1).apply({"params": params["block_1"]}, x1, None, kv)
  np.testing.assert_allclose(states[1], np.asarray(x1).reshape(-1, D), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(states[2], np.asarray(x2).reshape(-1, D), rtol=1e-5, atol=1e-5)
  weights = np.zeros((2, 8))
  weights[0, :5] = 1
  np.testing.assert_array_equal(linearity.block_states(model, params, tokens, weights),
                                states[:, :5])

  scores = linearity.layer_scores(model, params, _tokens(2))
  assert [s["layer"] for s in scores] == [0, 1]
  for s in scores:
    assert 0.0 < s["without_residual"] < s["with_residual"] <= 1.0, s


def test_replacing_an_exactly_linear_block_changes_nothing(model_and_params):
  model, params = model_and_params
  # Block 0 with zero attention and MLP output projections is the identity map.
  zeroed = jax.tree.map(lambda a: a, params)
  for proj in (zeroed["block_0"]["attn"]["o"], zeroed["block_0"]["mlp"]["down"]):
    proj["kernel"] = jnp.zeros_like(proj["kernel"])
  maps = linearity.fit_linear_blocks(model, zeroed, _tokens(3), layers=[0])
  a, b = maps[0]
  chex.assert_shape((a, b), ((D, D), (D,)))
  np.testing.assert_allclose(a, np.eye(D), atol=1e-6)
  tokens = _tokens(4, 2, 16)
  base = np.asarray(jax.jit(model.apply)({"params": zeroed}, tokens))
  replaced = np.asarray(linearity.replaced_apply(model, zeroed, maps, tokens))
  chex.assert_shape(replaced, (2, 16, V))
  assert np.max(np.abs(replaced - base)) < 1e-5
  # A fitted map of a real block is only an approximation: the logits move.
  maps = linearity.fit_linear_blocks(model, params, _tokens(3), layers=[0])
  moved = np.asarray(linearity.replaced_apply(model, params, maps, tokens))
  assert np.max(np.abs(moved - np.asarray(jax.jit(model.apply)({"params": params}, tokens)))) > 1e-3
  with pytest.raises(ValueError, match="underdetermined"):
    linearity.fit_linear_blocks(model, params, _tokens(3, 1, 16))


def test_replacement_curve(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="k=3 blocks of a model of depth 2"):
    linearity.replacement_curve(model, params, _tokens(5), [], ks=[3])
  tokens = _tokens(6, 2, 16)
  batches = [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}]
  curve = linearity.replacement_curve(model, params, _tokens(5), batches, ks=[0, 2])
  logits = jax.jit(model.apply)({"params": params}, batches[0]["inputs"])
  total, count = linearity.next_token_sums(logits, batches[0])
  assert curve[0] == {"k": 0, "replaced": [], "loss": pytest.approx(float(total / count), 1e-6)}
  assert sorted(curve[1]["replaced"]) == [0, 1] and np.isfinite(curve[1]["loss"])
  assert curve[1]["loss"] != pytest.approx(curve[0]["loss"], 1e-4)


def test_load_lm_refuses_a_directory_that_is_no_lm_run(tmp_path):
  with pytest.raises(InitFromError, match=r"load_lm: .* is not a jaxtricks run") as e:
    linearity.load_lm(str(tmp_path))
  assert "\n" not in str(e.value) and "--init_from" not in str(e.value)
  with pytest.raises(InitFromError, match="no such directory"):
    linearity.load_lm(str(tmp_path / "missing"))



def test_load_lm_gives_the_checkpoints_parameters(tmp_path):
  # The byte corpus needs the default vocabulary; remat models are analysed without remat.
  model_cfg = dataclasses.replace(CONFIG, vocab_size=ModelConfig().vocab_size, remat=True)
  train_cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=0, log_every=1,
                          ckpt_every=0, eval_batches=1, async_checkpoints=False)
  train(Config(model=model_cfg, train=train_cfg), str(tmp_path))
  model, params, config = linearity.load_lm(str(tmp_path))
  assert config.model == model_cfg and config.train.seq_len == 16
  saved = traverse_util.flatten_dict(checkpoint.read_numpy(str(tmp_path / "checkpoints"), 1)[
      "params"])
  loaded = traverse_util.flatten_dict(jax.device_get(params))
  assert set(loaded) == set(saved)
  for path, value in saved.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg="/".join(path))
  scores = linearity.layer_scores(model, params, _tokens(7))
  assert len(scores) == 2 and all(0.0 < s["with_residual"] <= 1.0 for s in scores)

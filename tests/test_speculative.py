"""Self-speculative decoding: token-identical to greedy decoding (random models, random prompts,
stop tokens, batches whose rows accept different numbers of drafts), real acceptance on a model
that has learned its data, sampling mode, and clear errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtricks.config import override
from jaxtricks.decode import generate, speculative_generate
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.mtp import TransformerHeads
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.train.losses import LOSSES

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=2,
                  attention=AttentionConfig(n_heads=4, n_kv_heads=2), mtp=TransformerHeads(heads=4))
P_MAX, NEW = 8, 24


def _prompts(seed: int, batch: int = 5) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  lengths = [P_MAX] + list(rng.integers(1, P_MAX + 1, batch - 1))  # one shape: one compile
  return [list(rng.integers(0, CFG.vocab_size, n)) for n in lengths]


def _assert_same(plain, spec):
  chex.assert_trees_all_equal((spec.tokens, spec.lengths), (plain.tokens, plain.lengths))


def _perturbed(params, seed):
  """Every parameter plus noise: zero-initialised heads (Medusa) then draft differently."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("kind", [  # the slow tier: the kinds the tree tests also decode
    "transformer", pytest.param("linear", marks=pytest.mark.slow),
    pytest.param("medusa", marks=pytest.mark.slow),
    pytest.param("sequential", marks=pytest.mark.slow)])
def test_greedy_speculative_equals_greedy_on_random_models(kind):
  model = Transformer(override(CFG, {"mtp": kind, "mtp.heads": 4}))
  init = jax.jit(model.init)  # one compilation for the four draws (eager init is slow)
  for seed in range(4):  # random weights and prompts, hypothesis-style
    params = _perturbed(init(jax.random.key(seed), jnp.zeros((1, P_MAX), jnp.int32))["params"],
                        seed)
    prompts = _prompts(seed)
    plain = generate(model, params, prompts, NEW)
    for k in (1, 2, 4):
      _assert_same(plain, speculative_generate(model, params, prompts, NEW, n_heads=k))
    stop = int(plain.tokens[0, NEW // 2])
    _assert_same(generate(model, params, prompts, NEW, stop_tokens=(stop,)),
                 speculative_generate(model, params, prompts, NEW, stop_tokens=(stop,)))


@pytest.fixture(scope="module")
def trained():
  """A 4-head model trained on sequences x_{t+1} = perm(x_t): every head can learn its offset."""
  model = Transformer(CFG)
  perm = np.random.default_rng(0).permutation(CFG.vocab_size)
  seqs = np.zeros((64, 33), np.int64)
  seqs[:, 0] = np.arange(64) % CFG.vocab_size
  for t in range(32):
    seqs[:, t + 1] = perm[seqs[:, t]]
  batch = {"inputs": jnp.asarray(seqs[:, :-1], jnp.int32),
           "targets": jnp.asarray(seqs[:, 1:], jnp.int32)}
  params = model.init(jax.random.key(0), batch["inputs"][:1])["params"]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: LOSSES["mtp"](model, p, batch)[0])(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(150):
    params, opt_state = step(params, opt_state)
  return model, params, perm


def test_acceptance_logged_in_evaluation_matches_decoding(trained):
  model, params, perm = trained
  seqs = np.zeros((8, 33), np.int64)
  seqs[:, 0] = np.arange(8) + 3
  for t in range(32):
    seqs[:, t + 1] = perm[seqs[:, t]]
  batch = {"inputs": jnp.asarray(seqs[:, :-1], jnp.int32),
           "targets": jnp.asarray(seqs[:, 1:], jnp.int32)}
  metrics = LOSSES["mtp"](model, params, batch, train=False)[1]
  accepts = [float(metrics[f"accept_{k}"]) for k in (2, 3, 4)]
  assert all(a > 0.9 for a in accepts), accepts  # the permutation task: drafts are right
  assert 3.5 < float(metrics["expected_tokens_per_forward"]) <= 4.0
  assert "accept_2" not in LOSSES["mtp"](model, params, batch, train=True)[1]  # eval only
  spec = speculative_generate(model, params, [list(seqs[0, :8])], NEW)
  assert spec.tokens_per_forward > 3.0


def test_medusa_heads_start_as_copies_of_the_next_token_head():
  cfg = override(CFG, {"mtp": "medusa"})
  model = Transformer(cfg)
  tokens = jnp.asarray(np.arange(12).reshape(2, 6) % 16, jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
  chex.assert_trees_all_equal(params["mtp_1"]["proj"]["kernel"],
                              np.zeros((32, 32), np.float32))  # W_k = 0
  h = model.apply({"params": params}, tokens, method="heads_hidden")
  for k in range(1, 4):
    chex.assert_trees_all_close(h[k], h[0])  # h + SiLU(h 0) = h
  with pytest.raises(ConfigError, match="model.mtp=medusa needs model.mtp.heads >= 2"):
    override(cfg, {"mtp.heads": 1}).validate()


def test_a_trained_model_accepts_its_drafts(trained):
  model, params, perm = trained
  prompts = _prompts(1)
  plain = generate(model, params, prompts, NEW)
  spec = speculative_generate(model, params, prompts, NEW)
  _assert_same(plain, spec)
  for row, prompt in zip(plain.tokens, prompts, strict=True):  # it learned the permutation
    expected = [perm[prompt[-1]]]
    for _ in range(NEW - 1):
      expected.append(perm[expected[-1]])
    np.testing.assert_array_equal(row, expected)
  assert spec.tokens_per_forward > 3.0, spec
  assert len(spec.acceptance_per_position) == 3
  assert min(spec.acceptance_per_position) > 0.8
  assert spec.forward_passes < plain.forward_passes


def test_partly_wrong_drafts_still_give_greedy_output(trained):
  # Noise on the draft heads makes rows accept different numbers of drafts at each pass.
  model, params, _ = trained
  noisy = dict(params)
  for i, scale in ((1, 0.3), (2, 0.6), (3, 1.0)):
    leaves, tree = jax.tree.flatten(params[f"mtp_{i}"])
    keys = jax.random.split(jax.random.key(i), len(leaves))
    noisy[f"mtp_{i}"] = jax.tree.unflatten(tree, [
        x + scale * jnp.std(x) * jax.random.normal(key, x.shape) for x, key in zip(
            leaves, keys, strict=True)])
  prompts = _prompts(2)
  spec = speculative_generate(model, noisy, prompts, NEW)
  _assert_same(generate(model, noisy, prompts, NEW), spec)
  assert 1.0 < spec.tokens_per_forward < 4.0, spec
  assert 0.0 < spec.acceptance_per_position[-1] < 1.0 or \
      0.0 < spec.acceptance_per_position[0] < 1.0, spec


def test_sampling_mode_accepts_drafts_and_returns_valid_tokens(trained):
  model, params, _ = trained
  prompts = _prompts(3)
  spec = speculative_generate(model, params, prompts, NEW, temperature=0.7, top_k=8,
                              rng=jax.random.key(1))
  chex.assert_shape(spec.tokens, (5, NEW))
  assert spec.lengths.tolist() == [NEW] * 5
  assert 0 <= spec.tokens.min() and spec.tokens.max() < CFG.vocab_size
  assert spec.tokens_per_forward > 2.0
  again = speculative_generate(model, params, prompts, NEW, temperature=0.7, top_k=8,
                               rng=jax.random.key(1))
  chex.assert_trees_all_equal(again.tokens, spec.tokens)  # deterministic given the key


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=0), r"n_heads=0 must be an int in \[1, 4\]"),
    (dict(n_heads=5), r"n_heads=5 must be an int in \[1, 4\]"),
    (dict(temperature=-1.0), "temperature=-1.0 must be finite and >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
])
def test_bad_arguments_are_refused(trained, kwargs, message):
  model, params, _ = trained
  kwargs = {"max_new_tokens": NEW, **kwargs}
  with pytest.raises(ValueError, match=message):
    speculative_generate(model, params, [[1, 2]], kwargs.pop("max_new_tokens"), **kwargs)


def test_sampling_with_chained_sequential_drafts_keeps_the_target_distribution():
  """Two sampled tokens after one prompt, 8,192 rows: the joint histogram of speculative
  sampling (sequential drafters chained, Leviathan rule) against plain sampling."""
  cfg = override(CFG, {"mtp": "sequential", "mtp.heads": 3, "vocab_size": 4})
  model = Transformer(cfg)
  params = _perturbed(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"], 0)
  prompts = [[1, 2, 3]] * 8192
  hist = lambda g: np.bincount(g.tokens[:, 0] * 4 + g.tokens[:, 1], minlength=16) / 8192
  plain = generate(model, params, prompts, 2, temperature=1.0, rng=jax.random.key(1))
  spec = speculative_generate(model, params, prompts, 2, temperature=1.0, rng=jax.random.key(2))
  assert spec.tokens_per_forward > 1.0  # drafts are accepted
  # Total variation; the sampling noise of two such histograms is about 0.025.
  assert 0.5 * np.abs(hist(plain) - hist(spec)).sum() < 0.06


def test_tree_verification_accepts_more_than_the_chain(trained):
  from jaxtricks.decode_tree import tree_generate  # noqa: PLC0415
  model, params, _ = trained
  prompts = [[1, 2, 3], [5], [7, 8]]
  params = _perturbed(params, 0)  # imperfect heads: the tree's other branches get used
  chain = speculative_generate(model, params, prompts, NEW)
  tree = tree_generate(model, params, prompts, NEW, tree=(3, 2, 1))
  _assert_same(generate(model, params, prompts, NEW), tree)
  assert tree.tokens_per_forward >= chain.tokens_per_forward

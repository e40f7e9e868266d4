"""Tree verification: the tree's structure and attention mask against a numpy construction, the
cache compaction, greedy output identical to `generate` (random models of every parallel head
kind, ragged batches, stop tokens), the stacked head layer equal to the heads in sequence, and
one-line errors for trees that cannot be drafted."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.config import override
from jaxtricks.decode import generate, init_cache
from jaxtricks.decode_tree import tree_generate
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.mtp import TransformerHeads
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops import tree as tree_ops

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=2,
                  attention=AttentionConfig(n_heads=4, n_kv_heads=2), mtp=TransformerHeads(heads=4))


def test_tree_structure_and_mask_match_a_numpy_construction():
  tree = tree_ops.build_tree((3, 2, 1))
  assert tree.size == 1 + 3 + 6 + 6
  mask = tree_ops.ancestor_mask(tree)
  for i in range(tree.size):  # walk up the parents by hand
    expected, n = {i}, i
    while tree.parent[n] >= 0:
      n = tree.parent[n]
      expected.add(n)
    assert set(np.flatnonzero(mask[i])) == expected
    assert tree.depth[i] == len(expected) - 1
  lengths = np.array([2, 5])
  got = np.asarray(tree_ops.tree_cache_mask(jnp.asarray(lengths), 24, mask))
  want = np.zeros((2, tree.size, 24), bool)
  for b, length in enumerate(lengths):
    want[b, :, :length] = True
    want[b, :, length:length + tree.size] = mask
  np.testing.assert_array_equal(got, want)


def test_acceptance_and_compaction_follow_the_deepest_accepted_path():
  tree = tree_ops.build_tree((2, 2))
  # Nodes: 0 root; 1, 2 (depth 1); 3, 4 under 1; 5, 6 under 2.
  tokens = jnp.array([[9, 4, 5, 7, 8, 1, 2]])
  pred = jnp.array([[5, 0, 1, 0, 0, 0, 0]])  # root predicts 5 (node 2), node 2 predicts 1 (node 5)
  best, depth = tree_ops.tree_accepts(tokens, pred, tree)
  assert (int(best[0]), int(depth[0])) == (5, 2)
  path = jnp.asarray(tree_ops.paths(tree))[best]
  np.testing.assert_array_equal(np.asarray(path), [[0, 2, 5]])
  x = jnp.arange(1 * 1 * 12 * 1, dtype=jnp.float32).reshape(1, 1, 12, 1)
  out = tree_ops.compact_cache({"layer_0": {"k": x}, "lengths": jnp.array([3])},
                               jnp.array([3]), path)["layer_0"]["k"]
  np.testing.assert_array_equal(np.asarray(out)[0, 0, :6, 0], [0, 1, 2, 3, 5, 8])


@pytest.mark.parametrize("kind, fields", [("transformer", {}),
                                          ("transformer", {"mtp.stacked_decode": True,
                                                           "attention.kv_sharing": 2}),
                                          ("medusa", {}), ("linear", {})])
def test_tree_greedy_equals_greedy_on_random_models(kind, fields):
  model = Transformer(override(CFG, {"mtp": kind, "mtp.heads": 4, **fields}))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  leaves, treedef = jax.tree.flatten(params)  # zero-initialised heads then draft differently
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys, strict=True)])
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, 16, n)) for n in (8, 3, 6)]
  plain = generate(model, params, prompts, 20)
  stop = int(plain.tokens[0, 10])
  for stops in ((), (stop,)):
    plain = generate(model, params, prompts, 20, stop_tokens=stops)
    got = tree_generate(model, params, prompts, 20, tree=(3, 2, 1), stop_tokens=stops)
    chex.assert_trees_all_equal((got.tokens, got.lengths), (plain.tokens, plain.lengths))


def test_stacked_head_layer_equals_the_heads_in_sequence():
  stacked = Transformer(override(CFG, {"mtp.stacked_decode": True}))
  plain = Transformer(CFG)
  params = plain.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 7)), jnp.int32)
  outs = []
  for model in (plain, stacked):
    decode = jax.jit(lambda t, c, model=model: model.apply(  # eager dispatch is 2x slower here
        {"params": params}, t, c, 4, method="decode_heads_hidden"))
    cache = init_cache(model.config, 2, 16, 4)
    h, cache = decode(tokens[:, :5], cache)
    h2, _ = decode(tokens[:, 5:], cache)
    outs.append(jnp.concatenate([h, h2], axis=2))
  assert "mtp_heads" in init_cache(stacked.config, 2, 16, 4)
  chex.assert_trees_all_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(outs[0], plain.apply({"params": params}, tokens,
                                                   method="heads_hidden"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields, kwargs, message", [
    ({}, dict(tree=(2, 0)), "tree branching 0 at depth 2 must be an int >= 1"),
    ({}, dict(tree=(1, 1, 1, 1)), "a tree of depth 4 needs 4 drafting heads; the model has 3"),
    ({}, dict(tree=(17,)), r"wider than the vocabulary \(16 tokens\)"),
    ({}, dict(tree=(2,), temperature=0.5), "tree decoding is greedy only"),
    ({"mtp": "sequential"}, dict(tree=(2,)), "'sequential' heads do not"),
    ({"attention.window": 4}, dict(tree=(2,)), "sliding window"),
    ({"attention": "lckv", "attention.warmup": 0}, dict(tree=(2,)),
     "'lckv' does not decode candidate trees"),
])
def test_bad_trees_are_refused(fields, kwargs, message):
  model = Transformer(override(CFG, fields))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match=message):
    tree_generate(model, params, [[1, 2]], 4, **kwargs)

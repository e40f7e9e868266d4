"""RMSNorm (arXiv 1910.07467) against numpy, eagerly and under jit (chex variants: the float32
computation and the dtype of the result), and its chex shape contract."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxtricks.ops.norm import rms_norm


class RMSNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1e-6, 1e-2)
  def test_matches_numpy(self, eps):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32) * 3.0
    scale = rng.normal(size=(16,)).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * scale
    got = self.variant(rms_norm, static_argnums=2)(jnp.asarray(x), jnp.asarray(scale), eps)
    chex.assert_type(got, jnp.float32)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_input_is_normalised_in_float32_and_returned_in_bfloat16(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 64)).astype(np.float32) * 100.0
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    got = self.variant(rms_norm)(x_bf16, jnp.ones((64,)))
    chex.assert_type(got, jnp.bfloat16)
    x64 = np.asarray(x_bf16.astype(jnp.float32), np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6)
    chex.assert_trees_all_close(np.asarray(got, np.float64), expected, rtol=1e-2, atol=1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_scale_must_match_the_last_axis(self):
    with pytest.raises(AssertionError, match=r"\[rms_norm: scale\]"):
      self.variant(rms_norm)(jnp.ones((2, 8)), jnp.ones((4,)))

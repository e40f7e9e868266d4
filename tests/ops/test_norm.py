"""RMSNorm (arXiv 1910.07467) against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtricks.ops.norm import rms_norm


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_matches_numpy(eps):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 16)).astype(np.float32) * 3.0
  scale = rng.normal(size=(16,)).astype(np.float32)
  x64 = x.astype(np.float64)
  expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * scale
  got = rms_norm(jnp.asarray(x), jnp.asarray(scale), eps)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_input_is_normalised_in_float32_and_returned_in_bfloat16():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 64)).astype(np.float32) * 100.0
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  got = rms_norm(x_bf16, jnp.ones((64,)))
  assert got.dtype == jnp.bfloat16
  x64 = np.asarray(x_bf16.astype(jnp.float32), np.float64)
  expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-2, atol=1e-2)

"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467): y = x / sqrt(mean(x^2) + eps) * g."""

import chex
import jax
import jax.numpy as jnp


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """Normalises the last axis in float32; returns x's dtype. `scale` has x's last axis."""
  chex.assert_shape(scale, (x.shape[-1],), custom_message="rms_norm: scale")
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)

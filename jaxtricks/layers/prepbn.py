"""PRepBN, progressive re-parameterised BatchNorm (SLAB: Guo, Chen, Tang, Wang 2024,
arXiv 2405.11582, Sec. 3.1), as the `prepbn` kind of the `norm` slot, and `affine`, the
per-channel map it folds into for inference:

    BN(x)     = (x - mu) / sqrt(sigma^2 + eps) * g + b          (per channel)
    RepBN(x)  = BN(x) + eta * x                                 (eta a learnable scalar)
    PRepBN(x) = gamma * RMSNorm(x) + (1 - gamma) * RepBN(x)
    gamma(t)  = 1 for t < warm, then r0 * max(0, 1 - (t - warm) / steps)

t counts the training forward passes the site has seen (SLAB's counter; one per train step).
With the running statistics (mu_r, sigma_r^2), RepBN(x) = a * x + c with
a = g / sqrt(sigma_r^2 + eps) + eta and c = b - g * mu_r / sqrt(sigma_r^2 + eps): once gamma = 0
the norm is that affine map (`merged_with`), no statistics computed. Folding a and c further
into the next projection (SLAB's `merge_bn`) is not done: the sites feed projections of every
kind.

Statistics and causality: as in SLAB, training normalises with the mean and variance of each
channel over all batch x token positions, so in training a token's output depends (through two
scalars per channel, each an average over B x T tokens) on later tokens of its own sequence.
The running statistics, an exponential average of those (`momentum`), are what evaluation,
decoding and the folded map use: there every position is normalised by fixed numbers, and the
model is causal. Padding tokens are not left out of the statistics (the norm does not see the
loss weights). Evaluation uses the current gamma: gamma RMSNorm + (1 - gamma) RepBN with running
statistics (SLAB's code evaluates RepBN alone whatever gamma; that equals ours once gamma = 0).
Initialisation: g = 1, b = 0, eta = 0, so that RepBN starts as standardisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtricks.errors import ConfigError
from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.ops.norm import rms_norm
from jaxtricks.registry import Component, register

STATS = "batch_stats"


def gamma_schedule(t: jnp.ndarray, warm: int, steps: int, r0: float = 1.0) -> jnp.ndarray:
  """gamma at forward pass t: 1 during `warm`, then r0 decaying linearly to 0 over `steps`."""
  t = jnp.asarray(t, jnp.float32)
  decayed = r0 * jnp.clip(1.0 - (t - warm) / steps, 0.0, 1.0)
  return jnp.where(t < warm, 1.0, decayed)


def repbn_affine(g, b, eta, mean, var, eps: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(a, c) with RepBN(x) = a * x + c under running statistics (mean, var)."""
  inv = jax.lax.rsqrt(var.astype(jnp.float32) + eps)
  return g * inv + eta, b - g * mean * inv


class PRepBN(nn.Module):
  eps: float = 1e-6
  momentum: float = 0.9
  warm: int = 0
  steps: int = 1000
  r0: float = 1.0
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    d, dtype = x.shape[-1], resolve_dtype(self.param_dtype)
    channel = lambda init: nn.with_logical_partitioning(init, ("norm",))
    scale = self.param("scale", channel(nn.initializers.ones), (d,), dtype)   # RMSNorm's
    g = self.param("bn_scale", channel(nn.initializers.ones), (d,), dtype)
    b = self.param("bn_bias", channel(nn.initializers.zeros), (d,), dtype)
    eta = self.param("eta", nn.initializers.zeros, (), dtype)
    mean = self.variable(STATS, "mean", channel(jnp.zeros), (d,), jnp.float32)
    var = self.variable(STATS, "var", channel(jnp.ones), (d,), jnp.float32)
    count = self.variable(STATS, "count", jnp.zeros, (), jnp.int32)
    gamma = gamma_schedule(count.value, self.warm, self.steps, self.r0)
    x32 = x.astype(jnp.float32)
    g32, b32, eta32 = (p.astype(jnp.float32) for p in (g, b, eta))
    if train:
      axes = tuple(range(x.ndim - 1))
      mu = jnp.mean(x32, axis=axes)
      sigma2 = jnp.mean(jnp.square(x32 - mu), axis=axes)
      rep = (x32 - mu) * jax.lax.rsqrt(sigma2 + self.eps) * g32 + b32 + eta32 * x32
      if self.is_mutable_collection(STATS) and not self.is_initializing():
        m = self.momentum
        mean.value = m * mean.value + (1 - m) * jax.lax.stop_gradient(mu)
        var.value = m * var.value + (1 - m) * jax.lax.stop_gradient(sigma2)
        count.value = count.value + 1
    else:
      a, c = repbn_affine(g32, b32, eta32, mean.value, var.value, self.eps)
      rep = x32 * a + c
    y = gamma * rms_norm(x32, scale, self.eps) + (1 - gamma) * rep
    return y.astype(x.dtype)


class Affine(nn.Module):
  """y = x * scale + bias per channel (a folded PRepBN)."""
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    d, dtype = x.shape[-1], resolve_dtype(self.param_dtype)
    channel = lambda init: nn.with_logical_partitioning(init, ("norm",))
    scale = self.param("scale", channel(nn.initializers.ones), (d,), dtype)
    bias = self.param("bias", channel(nn.initializers.zeros), (d,), dtype)
    return (x.astype(jnp.float32) * scale + bias).astype(x.dtype)


@register("norm", "affine")
@dataclasses.dataclass(frozen=True)
class AffineNormConfig(Component):
  """A per-channel affine map at every norm site: what `prepbn` folds into for inference."""

  def build(self, model: Any, name: str | None = None) -> nn.Module:
    return Affine(param_dtype=model.param_dtype, name=name)


@register("norm", "prepbn")
@dataclasses.dataclass(frozen=True)
class PRepBNConfig(Component):
  """PRepBN at every norm site: RMSNorm handed over to RepBN by gamma over `steps` training
  steps after `warm` (r0 the start of the decay); statistics averaged with `momentum`."""
  warm: int = 0
  steps: int = 1000
  r0: float = 1.0
  momentum: float = 0.9
  collections: ClassVar[tuple[str, ...]] = (STATS,)

  def validate(self, model: Any) -> None:
    if not 0.0 <= self.r0 <= 1.0:
      raise ConfigError(f"model.norm.r0={self.r0}: the gamma schedule must stay in [0, 1]")
    if self.warm < 0:
      raise ConfigError(f"model.norm.warm must be >= 0, got {self.warm}")
    if self.steps < 1:
      raise ConfigError(f"model.norm.steps must be >= 1, got {self.steps}")
    if not 0.0 <= self.momentum < 1.0:
      raise ConfigError(f"model.norm.momentum must be in [0, 1), got {self.momentum}")
    if model.mtp.heads > 1:
      raise ConfigError("model.norm=prepbn with multi-token heads (model.mtp.heads > 1) is not "
                        "supported: the heads' losses apply the final norm without its "
                        "statistics")

  def build(self, model: Any, name: str | None = None) -> nn.Module:
    return PRepBN(eps=model.norm_eps, momentum=self.momentum, warm=self.warm, steps=self.steps,
                  r0=self.r0, param_dtype=model.param_dtype, name=name)

  def merged_with(self, model: Any, params: dict, collections: dict) -> tuple[Component, dict]:
    """The affine kind and `params` with every site's RepBN folded under its running statistics;
    refused while some site's gamma is above 0 (its RMSNorm part does not fold)."""
    if STATS not in collections:
      raise ValueError("folding PRepBN needs its running statistics: pass the state's "
                       "collections (state.model_collections())")
    flat = traverse_util.flatten_dict(params)
    stats = traverse_util.flatten_dict(collections[STATS])
    for site in sorted({path[:-1] for path in flat if path[-1] == "bn_scale"}):
      gamma = float(gamma_schedule(stats[(*site, "count")], self.warm, self.steps, self.r0))
      if gamma > 0:
        raise ValueError(f"PRepBN at {'/'.join(site)} has gamma = {gamma:.3g} > 0 after "
                         f"{int(stats[(*site, 'count')])} steps: it folds into an affine map "
                         f"only once gamma = 0 (after model.norm.warm + model.norm.steps)")
      a, c = repbn_affine(*(jnp.asarray(flat.pop((*site, k)), jnp.float32)
                            for k in ("bn_scale", "bn_bias", "eta")),
                          stats[(*site, "mean")], stats[(*site, "var")], model.norm_eps)
      dtype = np.asarray(flat.pop((*site, "scale"))).dtype
      flat[(*site, "scale")], flat[(*site, "bias")] = a.astype(dtype), c.astype(dtype)
    return AffineNormConfig(), traverse_util.unflatten_dict(flat)

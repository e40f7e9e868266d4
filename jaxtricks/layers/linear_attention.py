"""The `linear` attention kind: SLAB's simplified linear attention, causal (Guo et al. 2024,
arXiv 2405.11582; jaxtricks.ops.linear_attention).

Q, K and V are the projections of the softmax kinds (any projection kind, grouped K/V heads);
there is no RoPE: the ReLU kernel would not keep its relative form, and order reaches the layer
through the causal prefix sums and the depthwise convolution on V (SLAB's vision model adds a
learned absolute position to K instead). Each layer's decode cache is its state (S, z) per K/V
head in float32 plus the last `conv - 1` values: the same bytes at every context length. A
state cannot be rolled back to an earlier length, so this kind neither verifies drafted blocks
(`rewinds`) nor candidate trees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig, output_projection
from jaxtricks.layers.dtypes import resolve_dtype
from jaxtricks.layers.linear import Linear
from jaxtricks.ops.kv_layout import LayerKV
from jaxtricks.ops.linear_attention import causal_conv, causal_linear_attention, conv_history
from jaxtricks.registry import register


class LinearAttention(nn.Module):
  """Called as SelfAttention is: (x_q, x_kv, positions, shared_kv, cache, train) ->
  (output (B, T, D), None (no K/V to share), updated cache or None)."""
  n_heads: int
  n_kv_heads: int
  head_dim: int
  conv: int = 4
  chunk: int = 64
  eps: float = 1e-6
  n_layers: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  projection: Callable[..., nn.Module] = Linear

  @nn.compact
  def __call__(self, xq_BxTxD: jnp.ndarray, xkv_BxTxD: jnp.ndarray,
               positions_BxT: jnp.ndarray | None, shared_kv: Any = None,
               cache: dict | None = None, train: bool = False
               ) -> tuple[jnp.ndarray, None, dict | None]:
    del shared_kv, train
    if cache is not None and positions_BxT is None:
      raise ValueError("decoding with a cache needs the positions of the new tokens")
    if cache is not None and "tree" in cache:
      raise ValueError("linear attention does not decode candidate trees")
    b, t, d = xq_BxTxD.shape
    n, kh, h = self.n_heads, self.n_kv_heads, self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    Linear = self.projection  # noqa: N806
    q_BxTxNxH = Linear((n, h), ("embed", "heads", "head_dim"), std=d ** -0.5, name="q",
                       **kw)(xq_BxTxD)
    k_BxTxKxH = Linear((kh, h), ("embed", "kv_heads", "head_dim"), std=d ** -0.5, name="k",
                       **kw)(xkv_BxTxD)
    v_BxTxKxH = Linear((kh, h), ("embed", "kv_heads", "head_dim"), std=d ** -0.5, name="v",
                       **kw)(xkv_BxTxD)
    w_WxH = self.param("conv", nn.with_logical_partitioning(
        nn.initializers.normal(max(self.conv, 1) ** -0.5), ("conv", "head_dim")),
        (self.conv, h), resolve_dtype(self.param_dtype))
    if cache is None:
      o_BxTxNxH, _ = causal_linear_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                             chunk=self.chunk, eps=self.eps)
      conv_BxTxKxH = causal_conv(v_BxTxKxH, w_WxH)
    else:
      lengths_B = positions_BxT[:, 0]
      n_B = jnp.clip(cache.get("limits", lengths_B + t) - lengths_B, 0, t)  # prefill padding
      valid_BxT = jnp.arange(t)[None] < n_B[:, None]
      o_BxTxNxH, (s, z) = causal_linear_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                                  (cache["s"], cache["z"]), valid_BxT,
                                                  self.chunk, self.eps)
      conv_BxTxKxH = causal_conv(v_BxTxKxH, w_WxH, cache["conv"])
      cache = {"s": s, "z": z, "conv": conv_history(cache["conv"], v_BxTxKxH, n_B)}
    o_BxTxKxGxH = o_BxTxNxH.reshape(b, t, kh, n // kh, h) + conv_BxTxKxH[:, :, :, None]
    o_BxTxNxH = o_BxTxKxGxH.reshape(b, t, n, h)
    return output_projection(Linear, o_BxTxNxH, d, self.n_layers, **kw), None, cache


@register("attention", "linear")
@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig(AttentionConfig):
  """Causal ReLU-kernel linear attention with a depthwise convolution of width `conv` on V
  (0: none), computed in chunks of `chunk` tokens; n_heads / n_kv_heads / head_dim as `mha`.
  Every layer has its own Q/K/V (no cross-layer sharing, no window, one implementation)."""
  conv: int = 4
  chunk: int = 64
  eps: float = 1e-6
  tree_decoding: ClassVar[bool] = False
  rewinds: ClassVar[bool] = False

  def validate(self, model: Any) -> None:
    self.check_heads(model)
    refused = {"kv_sharing": self.kv_sharing != 1, "kv_layout": bool(self.kv_layout),
               "window": bool(self.window), "impl": self.impl != "naive",
               "hyper_layers": bool(self.hyper_layers)}
    for name, set_ in refused.items():
      if set_:
        raise ConfigError(f"model.attention.{name}={getattr(self, name)!r}: linear attention "
                          f"keeps a state per layer and has one implementation; leave it at its "
                          f"default")
    if self.conv < 0:
      raise ConfigError(f"model.attention.conv must be >= 0 (0: no convolution), got {self.conv}")
    if self.chunk < 1:
      raise ConfigError(f"model.attention.chunk must be >= 1, got {self.chunk}")
    if not self.eps > 0:
      raise ConfigError(f"model.attention.eps must be > 0, got {self.eps}")

  def build(self, model: Any, spec: LayerKV, projection: Callable) -> nn.Module:
    del spec  # every layer produces its own K/V
    return LinearAttention(self.n_heads, self.kv_heads, self.head_size(model.d_model),
                           conv=self.conv, chunk=self.chunk, eps=self.eps,
                           n_layers=model.n_layers, dtype=model.dtype,
                           param_dtype=model.param_dtype, projection=projection, name="attn")

  def kv_cache(self, model: Any, batch: int, max_len: int, window: int = 0,
               chunk: int = 1) -> dict:
    """One layer's zeroed state: S (B, K, H, H) and z (B, K, H) in float32, the last conv - 1
    values (B, conv - 1, K, H); none depends on max_len."""
    del max_len, window, chunk
    k, h = self.kv_heads, self.head_size(model.d_model)
    return {"s": jnp.zeros((batch, k, h, h), jnp.float32),
            "z": jnp.zeros((batch, k, h), jnp.float32),
            "conv": jnp.zeros((batch, max(self.conv - 1, 0), k, h), resolve_dtype(model.dtype))}

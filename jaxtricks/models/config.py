"""`ModelConfig`: the backbone's sizes and one component per slot (jaxtricks.registry).

    ModelConfig(d_model=128, n_layers=4,
                attention=AttentionConfig(n_heads=4, n_kv_heads=1, kv_sharing=2),
                mlp=KANMLPConfig(grid=5), mtp=TransformerHeads(heads=4),
                projection=SlopeProjection(n=2, m=4), norm=RMSNormConfig())

On the command line a slot takes a kind and its fields take values: `--model.mlp=kan
--model.mlp.grid=5`, `--model.mtp.heads=4`, `--model.projection=slope`.
"""

from __future__ import annotations

import dataclasses

from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.dtypes import DTYPES
from jaxtricks.layers.embed import LinearHeadConfig, TokenEmbedConfig
from jaxtricks.layers.linear import DenseProjection
from jaxtricks.layers.mlp import SwiGLUConfig
from jaxtricks.layers.mtp import TransformerHeads
from jaxtricks.layers.norm import RMSNormConfig
from jaxtricks.models.regulariser import NoRegulariser
from jaxtricks.registry import SLOTS, Component


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  max_len: int = 0             # 0 means unbounded (RoPE needs no table)
  norm_eps: float = 1e-6
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  remat: bool = False          # recompute each block in the backward pass to save memory
  embed: Component = TokenEmbedConfig()
  attention: Component = AttentionConfig()
  mlp: Component = SwiGLUConfig()
  head: Component = LinearHeadConfig()
  mtp: Component = TransformerHeads()   # heads = 1: an ordinary next-token LM
  projection: Component = DenseProjection()
  norm: Component = RMSNormConfig()    # every norm site: before attention and MLP, K/V, final
  regulariser: Component = NoRegulariser()  # a term of the training objective (no parameters)

  def components(self) -> tuple[Component, ...]:
    return tuple(getattr(self, slot) for slot in SLOTS)

  @property
  def depth(self) -> int:
    """Blocks on the next-token path: n_layers less what components take (compute matching)."""
    return self.n_layers - sum(c.layers_removed(self) for c in self.components())

  @property
  def dim_per_head(self) -> int:
    return self.attention.head_size(self.d_model)

  @property
  def kv_source(self) -> tuple[int, ...]:
    """Block i attends with the K/V of block kv_source[i]."""
    return self.attention.kv_source(self.depth)

  @property
  def kv_plan(self) -> tuple:
    """One jaxtricks.ops.kv_layout.LayerKV per trunk block: source layer and window."""
    return self.attention.kv_plan(self.depth)

  @property
  def kv_producers(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.kv_source)))

  @property
  def cross_layer(self) -> bool:
    """Whether some trunk block reads another block's K/V (its producers then get a kv_norm)."""
    return len(self.kv_producers) < self.depth

  def trains(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` trains: unless some component freezes it."""
    return all(c.trains(self, path) for c in self.components())

  @property
  def rng_streams(self) -> tuple[str, ...]:
    """PRNG streams the model draws from in training (Flax `rngs` names), in slot order."""
    return tuple(dict.fromkeys(s for c in self.components() for s in c.rng_streams))

  @property
  def collections(self) -> tuple[str, ...]:
    """Variable collections besides `params` the train state carries, in slot order."""
    return tuple(dict.fromkeys(n for c in self.components() for n in c.collections))

  def validate(self) -> None:
    for name in ("vocab_size", "d_model", "n_layers"):
      if getattr(self, name) < 1:
        raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; valid: "
                          f"{', '.join(DTYPES)}")
    for slot in SLOTS:
      if getattr(self, slot).slot != slot:
        raise ConfigError(f"model.{slot} holds a {type(getattr(self, slot)).__name__}, a "
                          f"component of slot {getattr(self, slot).slot!r}")
    if self.depth < 1:
      raise ConfigError(f"the components remove {self.n_layers - self.depth} of "
                        f"model.n_layers={self.n_layers} layers: nothing is left")
    for component in self.components():
      component.validate(self)

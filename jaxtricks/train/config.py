"""Training hyperparameters and run control."""

from __future__ import annotations

import dataclasses

from jaxtricks.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 32          # global, across all devices and processes
  seq_len: int = 256
  lr: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0        # global norm; 0 disables
  loss: str = "lm"              # name in jaxtricks.train.losses.LOSSES
  seed: int = 0
  log_every: int = 50
  eval_every: int = 0           # 0: evaluate only at the end
  eval_batches: int = 8
  ckpt_every: int = 500         # 0: only at the end
  keep_checkpoints: int = 2
  async_checkpoints: bool = True
  skip_nonfinite: bool = False  # True: a NaN/inf step is skipped (update dropped), not fatal
  tensorboard: bool = False     # also write TensorBoard event files (scalars, PNG figures)
  init_from: str = ""           # a pretrained run's workdir: start from its parameters

  def validate(self) -> None:
    for name in ("steps", "batch_size", "seq_len", "eval_batches", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("warmup_steps", "log_every", "eval_every", "ckpt_every", "grad_clip",
                 "weight_decay"):
      if getattr(self, name) < 0:
        raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
    if self.lr <= 0:
      raise ConfigError(f"train.lr must be > 0, got {self.lr}")
    from jaxtricks.train.losses import LOSSES  # noqa: PLC0415 (registry filled on import)
    if self.loss not in LOSSES:
      raise ConfigError(f"train.loss={self.loss!r} is unknown; valid: {', '.join(sorted(LOSSES))}")

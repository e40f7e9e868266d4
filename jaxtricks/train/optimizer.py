"""AdamW (Loshchilov & Hutter, arXiv 1711.05101) with linear warm-up, cosine decay and global-norm
gradient clipping. Weight decay applies to matrices only, not to norm scales.

Given the model, each of its components may change the optimizer through the hook it registered
(jaxtricks.train.hooks): e.g. SLoPe keeps state for the kept entries of its sparse kernels only
and trains its adapters late (jaxtricks.train.sparse_optimizer).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import optax

import jaxtricks.components  # noqa: F401 (registers every component's hooks)
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.hooks import OPTIMIZER_HOOKS, OptimizerParts


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _adamw(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)


def make_optimizer(cfg: TrainConfig, model: nn.Module | None = None
                   ) -> optax.GradientTransformation:
  schedule = lr_schedule(cfg)
  adamw = functools.partial(_adamw, cfg)
  parts = OptimizerParts(cfg, model, schedule, adamw, adamw(schedule))
  for component in (model.config.components() if model is not None else ()):
    hook = OPTIMIZER_HOOKS.get(type(component))
    if hook is not None:
      hook(parts, component)
  first = list(parts.first)
  if cfg.grad_clip:
    first.append(optax.clip_by_global_norm(cfg.grad_clip))
  tx = optax.chain(*first, parts.core) if first else parts.core
  for wrap in parts.wrappers:
    tx = wrap(tx)
  return tx

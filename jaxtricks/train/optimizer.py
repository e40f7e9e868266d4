"""AdamW (Loshchilov & Hutter, arXiv 1711.05101) with linear warm-up, cosine decay and global-norm
gradient clipping. Weight decay applies to matrices only, not to norm scales.

Given the model, its sparse kernels get optimizer state for their kept entries only and its lazy
low-rank adapters train from `model.adapter_start` of the run on (SLoPe, arXiv 2405.16325; see
jaxtricks.train.sparse_optimizer).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import optax

from jaxtricks.models.sparse import nm_leaves
from jaxtricks.train import sparse_optimizer
from jaxtricks.train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _adamw(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)


def adapter_start_step(cfg: TrainConfig, model_config) -> int:
  return int(round(model_config.adapter_start * cfg.steps))


def make_optimizer(cfg: TrainConfig, model: nn.Module | None = None
                   ) -> optax.GradientTransformation:
  schedule = lr_schedule(cfg)
  core = _adamw(cfg, schedule)
  first = []
  mc = getattr(model, "config", None)
  if mc is not None and getattr(mc, "sparsity", "none") != "none" and mc.adapter_rank:
    start = adapter_start_step(cfg, mc)
    late = sparse_optimizer.after_step(_adamw(cfg, lambda count: schedule(count + start)), start)
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda a: "adapter" if a else "main", sparse_optimizer.is_adapter(params))
    core = optax.chain(optax.multi_transform({"main": core, "adapter": late}, labels),
                       sparse_optimizer.draw_adapters(start, cfg.seed))
    first.append(sparse_optimizer.zero_until(start, sparse_optimizer.is_adapter))
  if cfg.grad_clip:
    first.append(optax.clip_by_global_norm(cfg.grad_clip))
  tx = optax.chain(*first, core) if first else core
  if mc is not None and getattr(mc, "sparsity", "none") == "slope":
    leaves = nm_leaves(model)
    tx = sparse_optimizer.keep_nm_sparse(tx, leaves)
    if mc.mask_change_freq > 1 and mc.sparse_backward == "double":
      tx = sparse_optimizer.refresh_col_masks(tx, mc.mask_change_freq, leaves)
  return tx

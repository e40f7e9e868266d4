"""SLoPe: double-pruned N:M sparse pretraining with lazy low-rank adapters (Mozaffari et al. 2024,
arXiv 2405.16325) against dense training, SR-STE and a dense model of half the width.

    python launch.py --exp=slope                 # default preset, about 8 minutes on 2 CPU cores
    python launch.py --exp=slope --preset=smoke

Trains, with equal steps and tokens on the embedded corpus: `dense`; `slope` (2:4 static masks,
double-pruned backward, no adapters); `slope_adapters` (plus rank-r adapters over the last
1 - adapter_start of the steps); `srste` (dynamic masks, Zhou et al. 2021); `dense_half` (half
d_model). `--variants=slope_exact_backward` adds an ablation: static masks, exact input gradient;
`--model.projection.mask_change_freq=100` holds the backward's transposed mask for 100 steps at a
time.
The attention and MLP projections are pruned; the embedding and output head stay dense.
XLA has no N:M sparse matmul, so sparse layers run as masked dense matmuls: no speed-up is
claimed; the memory figures come from the actual compressed arrays.

summary.json: `variants` = [{name, val_loss, params, nonzero_params, ...}], `extra_zero_fraction`
(of the SLoPe model's trained kernels, as the backward prunes them; `extra_zero_fraction_at_init`
and `extra_zero_fraction_expected` beside it), `memory` = {dense_weight_bytes,
compressed_weight_bytes, dense_train_state_bytes, sparse_train_state_bytes, ...}, `ordering`,
`static_masks_held` (the trained kernels are non-zero exactly where the initial masks kept), and
`compressed_checkpoint` (the SLoPe model's compressed parameters written with orbax to
`slope_compressed/` and read back).
The paper's order of loss: dense < SLoPe + adapters <= SLoPe < SR-STE.
"""

from __future__ import annotations

import dataclasses
import os
import time

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from experiments.variants import run_variants, variant_key
from jaxtricks import metrics as mlog
from jaxtricks.checkpoint import load_tree, save_tree
from jaxtricks.config import Config, flatten, to_dict
from jaxtricks.errors import ConfigError
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.layers.linear import DenseProjection
from jaxtricks.layers.nm_projection import SlopeProjection, SRSTEProjection
from jaxtricks.layers.sparse_linear import NMLeaf
from jaxtricks.models import sparse
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops.sparsity import expected_extra_zeros
from jaxtricks.train.config import TrainConfig
from jaxtricks.train.loop import train
from jaxtricks.train.sparse_optimizer import recorded_positions

PRESETS = ("smoke", "default", "full")
VARIANTS = ("dense", "slope", "slope_adapters", "srste", "dense_half")
# run only when named in --variants: SLoPe's static masks with the exact input gradient
ABLATIONS = ("slope_exact_backward",)


def variant_config(base: ModelConfig, name: str, srste_decay: float = 2e-4) -> ModelConfig:
  """The model config of a variant; N:M, blocks, targets, adapter rank and start come from
  `base`, whose projection is SLoPe's."""
  p = base.projection
  rank = p.adapter_rank or max(base.d_model // 16, 1)
  srste = SRSTEProjection(n=p.n, m=p.m, blocks=p.blocks, targets=p.targets, decay=srste_decay)
  half = dict(d_model=base.d_model // 2, mlp=dataclasses.replace(base.mlp, d_ff=base.mlp.d_ff // 2))
  changes = {
      "dense": dict(projection=DenseProjection()),
      "slope": dict(projection=dataclasses.replace(p, adapter_rank=0)),
      "slope_adapters": dict(projection=dataclasses.replace(p, adapter_rank=rank)),
      "srste": dict(projection=srste),
      "dense_half": dict(projection=DenseProjection(), **half),
      "slope_exact_backward": dict(projection=dataclasses.replace(p, adapter_rank=0,
                                                                  backward="exact")),
  }[name]
  return dataclasses.replace(base, **changes)


@dataclasses.dataclass(frozen=True)
class SlopeConfig(Config):
  model: ModelConfig = ModelConfig(projection=SlopeProjection())
  variants: tuple[str, ...] = ()  # empty: the five of VARIANTS; ABLATIONS may be named too
  srste_decay: float = 2e-4       # the srste variant's lambda_w

  def validate(self) -> SlopeConfig:
    if self.model.projection.kind != "slope":
      raise ConfigError(f"--exp=slope derives its variants from a SLoPe projection (N:M, "
                        f"targets, adapters); model.projection={self.model.projection.kind!r} "
                        "cannot be one")
    super().validate()
    return self

  def variant(self, name: str) -> Config:
    """The training config of variant `name` (the model of the variant, the same data and
    steps)."""
    return Config(model=variant_config(self.model, name, self.srste_decay), train=self.train,
                  data=self.data, mesh=self.mesh)


def get_config(preset: str) -> SlopeConfig:
  if preset == "smoke":
    return SlopeConfig(
        model=ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=2),
                          projection=SlopeProjection(adapter_rank=2, adapter_start=0.5)),
        train=TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, log_every=3,
                          ckpt_every=0, eval_batches=1))
  if preset == "default":
    return SlopeConfig(
        model=ModelConfig(d_model=128, n_layers=4, attention=AttentionConfig(n_heads=4),
                          projection=SlopeProjection(adapter_rank=8)),
        train=TrainConfig(steps=250, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=25,
                          log_every=25, ckpt_every=0, eval_batches=8))
  return SlopeConfig(
      model=ModelConfig(d_model=768, n_layers=12, attention=AttentionConfig(n_heads=12),
                        projection=SlopeProjection(adapter_rank=16)),
      train=TrainConfig(steps=20_000, batch_size=64, seq_len=1024, lr=1e-3, warmup_steps=1000,
                        log_every=100, ckpt_every=2000, eval_batches=32))


def _random_extra_zeros(model_config: ModelConfig, seed: int) -> dict[str, float]:
  """Extra zeros of the double-pruned backward on random normal weights of the SLoPe model's
  kernel shapes, for its N:M and for 1:2 and 2:8."""
  mc = variant_config(model_config, "slope")
  leaves = sparse.nm_leaves(Transformer(mc))
  shapes = traverse_util.flatten_dict(nn.unbox(jax.eval_shape(
      Transformer(mc).init, jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))["params"]))
  rng = np.random.default_rng(seed)
  weights = traverse_util.unflatten_dict(
      {p: rng.standard_normal(shapes[p].shape).astype(np.float32) for p in leaves})
  out = {}
  for n, m in ((mc.projection.n, mc.projection.m), (1, 2), (2, 8)):
    if mc.d_model % m or mc.dim_per_head % m or mc.mlp.width(mc) % m:
      continue
    nm = {p: NMLeaf(n, m, leaf.axis) for p, leaf in leaves.items()}
    out[f"{n}:{m}"] = sparse.extra_zero_fraction(weights, nm)
  return out


def _save_compressed(tree, path: str) -> dict:
  """Writes the SLoPe model's compressed parameters with orbax and reads them back."""
  save_tree(path, tree)
  back = load_tree(path, tree)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back),
                                                  strict=True))
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
                for f in files)
  return {"path": os.path.basename(path), "bytes_on_disk": on_disk, "round_trip_exact": same}


def _train_variant(config: SlopeConfig, name: str, directory: str, workdir: str) -> dict:
  """Trains variant `name`; its row, with the memory figures and checks the summary needs."""
  model_cfg = config.variant(name).model
  result = train(config.variant(name), directory, exp=f"slope/{name}")
  leaves = sparse.nm_leaves(result.model)
  state = jax.device_get(result.state)
  params, kernel_paths = state.params, set(leaves)
  as_trained = sparse.tree_bytes(params) + sparse.tree_bytes(state.opt_state)
  # SLoPe's static-mask kernels can be held compressed; SR-STE's pruned weights can come back,
  # so its training state stays dense.
  packed = sparse.compress_params(params, leaves) if model_cfg.projection.kind == "slope" else (
      params)
  compressed = sparse.tree_bytes(packed) + sparse.tree_bytes(state.opt_state)
  row = {
      "name": name,
      "val_loss": result.summary["val_loss"],
      "val_bits_per_byte": result.summary["val_bits_per_byte"],
      "params": result.summary["params"],
      "nonzero_params": sparse.nonzero_params(params, leaves),
      "train_state_bytes": as_trained,
      "train_state_bytes_compressed": compressed,
      "tokens_per_s": result.summary["tokens_per_s"],
  }
  if name == "dense":
    # the dense run's weights and optimizer state at the kernels the SLoPe model prunes
    pruned = set(sparse.nm_leaves(Transformer(config.variant("slope").model)))
    row["memory"] = {
        "dense_train_state_bytes": as_trained,
        "pruned_layers_dense_state_bytes": (sparse.bytes_at(params, pruned)
                                            + sparse.bytes_at(state.opt_state, pruned))}
  if name == "slope":
    row["memory"] = {
        "dense_weight_bytes": sparse.bytes_at(params, kernel_paths),
        "compressed_weight_bytes": sparse.bytes_at(packed, kernel_paths),
        "model_dense_bytes": sparse.tree_bytes(params),
        "model_compressed_bytes": sparse.tree_bytes(packed),
        "sparse_train_state_bytes": compressed,
        "sparse_train_state_bytes_as_trained": as_trained,
        "pruned_layers_sparse_state_bytes": (sparse.bytes_at(packed, kernel_paths)
                                             + sparse.bytes_at(state.opt_state, kernel_paths)),
    }
    row["checks"] = {
        "extra_zero_fraction": sparse.extra_zero_fraction(params, leaves),
        "static_masks_held": sparse.static_masks_held(
            params, recorded_positions(state.opt_state), leaves),
        "compressed_checkpoint": _save_compressed(
            packed, os.path.join(workdir, "slope_compressed")),
    }
  mlog.log_progress(f"{name}: " + ", ".join(
      f"{k} {v}" for k, v in row.items() if not isinstance(v, dict)))
  return row


def memory_summary(rows: dict[str, dict]) -> dict:
  """The memory figures of the dense and SLoPe rows, and their ratios where both ran."""
  memory = {**rows.get("dense", {}).get("memory", {}), **rows.get("slope", {}).get("memory", {})}
  if "dense_weight_bytes" in memory:
    memory["compressed_weight_ratio"] = (memory["compressed_weight_bytes"]
                                         / memory["dense_weight_bytes"])
  if "dense_train_state_bytes" in memory and "sparse_train_state_bytes" in memory:
    memory["train_state_ratio"] = (memory["sparse_train_state_bytes"]
                                   / memory["dense_train_state_bytes"])
    memory["pruned_layers_state_ratio"] = (memory["pruned_layers_sparse_state_bytes"]
                                           / memory["pruned_layers_dense_state_bytes"])
  return memory


def run(config: SlopeConfig, workdir: str) -> dict:
  names = config.variants or VARIANTS
  unknown = [n for n in names if n not in VARIANTS + ABLATIONS]
  if unknown:
    raise ConfigError(f"unknown variants {unknown}; valid: {', '.join(VARIANTS + ABLATIONS)}")
  for name in names:  # refuse a bad config before any training
    config.variant(name).validate()
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  mlog.write_json(os.path.join(workdir, "config.json"), dict(to_dict(config), exp="slope"))
  rows = run_variants(
      workdir, names,
      lambda name: variant_key(config.variant(name), ignore=("variants",)),
      lambda name, directory: _train_variant(config, name, directory, workdir))
  by_name = {r["name"]: r for r in rows}
  at_init = _random_extra_zeros(config.model, config.train.seed)
  table = [{k: v for k, v in r.items() if k not in ("memory", "checks")} for r in rows]
  summary = {
      "exp": "slope", "steps": config.train.steps, "variants": table,
      **by_name.get("slope", {}).get("checks", {}),
      "extra_zero_fraction_at_init": at_init,
      "extra_zero_fraction_expected": {k: expected_extra_zeros(*map(int, k.split(":")))
                                       for k in at_init},
      "memory": memory_summary(by_name),
      "ordering": [r["name"] for r in sorted(rows, key=lambda r: r["val_loss"])],
      "wall_s": time.time() - t_start, "config": flatten(config),
  }
  mlog.log_progress(format_table(table))
  mlog.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def format_table(rows: list[dict]) -> str:
  head = f"{'variant':<15} {'params':>9} {'nonzero':>9} {'val loss':>9} {'state B':>11}"
  return "\n".join([head] + [
      f"{r['name']:<15} {r['params']:>9,} {r['nonzero_params']:>9,} {r['val_loss']:>9.4f} "
      f"{r['train_state_bytes_compressed']:>11,}" for r in rows])

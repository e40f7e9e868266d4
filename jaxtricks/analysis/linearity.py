"""Layer linearity and linear replacement of blocks ("Your Transformer is Secretly Linear",
Razzhigaev et al. 2024, arXiv 2405.12250; reference code AIRI-Institute/LLM-Microscope).

Linearity score of block i, X (N x D) the residual stream entering it and Y leaving it, all
positions of all rows stacked:
  X~ = (X - 1 mean(X)) / ||X - 1 mean(X)||_F,  Y~ likewise,
  A = X~^+ Y~ (unconstrained least squares),   score = 1 - ||X~ A - Y~||_F^2  in [0, 1];
without the residual: score(X, Y - X) (the block's own contribution). The fit is exact, and every
score 1, unless N > D + 1 (centring removes one degree of freedom), so calibration needs many
more tokens than the width.

Linear replacement: block i is replaced by the affine map x -> x A + b fitted by least squares
from its input to its output states on calibration tokens (uncentred). The replaced block is
still called and only its residual output is substituted, so its K/V and cache reach the layers
that read them in any K/V layout (cross-layer, LCKV); this is exact, and costs the block's
compute. States and replacement use `flax.linen.intercept_methods` on the trunk's `Block`s; the
model itself is not changed (a remat model is run without remat: the same parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks import sharding
from jaxtricks.config import Config, from_dict
from jaxtricks.models.block_hooks import recorded_blocks, replaced_blocks, without_remat
from jaxtricks.models.transformer import Transformer
from jaxtricks.ops.losses import cross_entropy
from jaxtricks.train import init_from
from jaxtricks.train.build import build

Maps = dict[int, tuple[np.ndarray, np.ndarray]]


def _check_enough_tokens(n: int, d: int) -> None:
  if n <= d + 1:
    raise ValueError(f"the least-squares fit is underdetermined with N={n} tokens <= D+1={d + 1} "
                     "(D the width): every score would be 1; give more calibration tokens")


def _centred_unit(m_NxD: np.ndarray) -> np.ndarray:
  m_NxD = m_NxD - m_NxD.mean(axis=0, keepdims=True)
  norm = np.linalg.norm(m_NxD)
  return m_NxD / norm if norm > 0 else m_NxD  # a constant stream stays 0: fitted exactly


def linearity_score(x_NxD: Any, y_NxD: Any) -> float:
  """1 - ||X~ A - Y~||_F^2 with X~, Y~ centred and of unit Frobenius norm, A = X~^+ Y~ (float64)."""
  x_NxD, y_NxD = np.asarray(x_NxD, np.float64), np.asarray(y_NxD, np.float64)
  if x_NxD.ndim != 2 or x_NxD.shape[0] != y_NxD.shape[0] or y_NxD.ndim != 2:
    raise ValueError(f"linearity_score needs (N, D) and (N, D') arrays, got {x_NxD.shape} and "
                     f"{y_NxD.shape}")
  _check_enough_tokens(x_NxD.shape[0], x_NxD.shape[1])
  x_NxD, y_NxD = _centred_unit(x_NxD), _centred_unit(y_NxD)
  a_DxD = np.linalg.lstsq(x_NxD, y_NxD, rcond=None)[0]
  return float(1.0 - np.sum((x_NxD @ a_DxD - y_NxD) ** 2))


def linearity_score_without_residual(x_NxD: Any, y_NxD: Any) -> float:
  """score(X, Y - X): the block's input against its own contribution to the stream."""
  x_NxD = np.asarray(x_NxD, np.float64)
  return linearity_score(x_NxD, np.asarray(y_NxD, np.float64) - x_NxD)


def _variables(params: dict) -> dict:
  """`params` as `model.apply` takes it: a parameter tree, or a variables dict with 'params'
  (and the model's other collections)."""
  return params if "params" in params else {"params": params}


def block_states(model: Transformer, params: dict, tokens_BxT: Any,
                 weights_BxT: Any = None) -> np.ndarray:
  """(L+1, N, D) float32: the residual stream entering each of the L trunk blocks and leaving
  the last (pre final norm), N = B*T tokens (those with weight > 0 when `weights_BxT`)."""
  plain = without_remat(model)
  depth = plain.config.depth

  @jax.jit
  def run(variables, tokens):
    record: dict = {}
    with recorded_blocks(record):
      plain.apply(variables, tokens, method="hidden")
    missing = sorted(set(range(depth)) - set(record))
    if missing:
      raise RuntimeError(f"block_states: trunk blocks {missing} were not called")
    return [record[0][0]] + [record[i][1] for i in range(depth)]

  states = [np.asarray(s, np.float32) for s in run(_variables(params), jnp.asarray(tokens_BxT))]
  states_LxNxD = np.stack([s.reshape(-1, s.shape[-1]) for s in states])
  if weights_BxT is not None:
    states_LxNxD = states_LxNxD[:, np.asarray(weights_BxT).reshape(-1) > 0]
  return states_LxNxD


def layer_scores(model: Transformer, params: dict, tokens_BxT: Any,
                 weights_BxT: Any = None) -> list[dict]:
  """Per trunk block: {'layer', 'with_residual', 'without_residual'} linearity scores."""
  states = block_states(model, params, tokens_BxT, weights_BxT)
  _check_enough_tokens(states.shape[1], states.shape[2])
  return [{"layer": i, "with_residual": linearity_score(states[i], states[i + 1]),
           "without_residual": linearity_score_without_residual(states[i], states[i + 1])}
          for i in range(states.shape[0] - 1)]


def _affine_fit(x_NxD: np.ndarray, y_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares (A, b) with Y ~ X A + b, in float64 (centred for conditioning)."""
  x_NxD, y_NxD = x_NxD.astype(np.float64), y_NxD.astype(np.float64)
  mx_D, my_D = x_NxD.mean(0), y_NxD.mean(0)
  a_DxD = np.linalg.lstsq(x_NxD - mx_D, y_NxD - my_D, rcond=None)[0]
  return a_DxD, my_D - mx_D @ a_DxD


def fit_linear_blocks(model: Transformer, params: dict, tokens_BxT: Any,
                      layers: Sequence[int] | None = None, weights_BxT: Any = None) -> Maps:
  """{layer: (A_DxD, b_D)} float64, each block's output fitted from its input (default: every
  trunk block) on the calibration tokens."""
  states = block_states(model, params, tokens_BxT, weights_BxT)
  depth = states.shape[0] - 1
  layers = range(depth) if layers is None else layers
  bad = [i for i in layers if not 0 <= i < depth]
  if bad:
    raise ValueError(f"layers {bad} are not trunk blocks of a model of depth {depth}")
  _check_enough_tokens(states.shape[1], states.shape[2])
  return {int(i): _affine_fit(states[i], states[i + 1]) for i in layers}


def replaced_apply(model: Transformer, params: dict, maps: dict[int, tuple[Any, Any]],
                   tokens_BxT: Any, method: str | Callable | None = None, **kwargs) -> Any:
  """`model.apply(params, tokens, method=method, **kwargs)` with the blocks of `maps` replaced by
  their affine maps (jitted; `kwargs` static)."""
  plain = without_remat(model)

  @jax.jit
  def run(variables, maps, tokens):
    with replaced_blocks(maps):
      return plain.apply(variables, tokens, method=method, **kwargs)

  maps = {int(i): (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
          for i, (a, b) in maps.items()}
  return run(_variables(params), maps, jnp.asarray(tokens_BxT))


def next_token_sums(logits_BxTxV: jnp.ndarray, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sum of next-token cross entropies, sum of weights) of a batch with 'targets' (B, T) and
  optional 'weights'."""
  return cross_entropy(logits_BxTxV, batch["targets"], batch.get("weights"))


def most_linear_layers(scores: list[dict], k: int) -> list[int]:
  """The k blocks with the highest with-residual score, most linear first."""
  depth = len(scores)
  if not 0 <= k <= depth:
    raise ValueError(f"cannot replace k={k} blocks of a model of depth {depth}")
  order = sorted(scores, key=lambda s: -s["with_residual"])
  return [int(s["layer"]) for s in order[:k]]


def replacement_curve(model: Transformer, params: dict, calib_tokens_BxT: Any,
                      eval_batches: Sequence[dict], loss_fn: Callable = next_token_sums,
                      ks: Sequence[int] | None = None, calib_weights_BxT: Any = None
                      ) -> list[dict]:
  """Held-out loss with the k most linear blocks (with-residual score on the calibration tokens)
  replaced by their fitted affine maps, for k in `ks` (default 0..L-1; k = 0 is the model
  itself): [{'k', 'replaced', 'loss'}]. `loss_fn(logits, batch) -> (sum, count)` on batches with
  'inputs'; the loss is sum / count over all batches. One compilation for every k."""
  plain = without_remat(model)
  depth = plain.config.depth
  ks = list(range(depth)) if ks is None else list(ks)
  for k in ks:
    most_linear_layers([{"layer": i, "with_residual": 0.0} for i in range(depth)], k)
  states = block_states(plain, params, calib_tokens_BxT, calib_weights_BxT)
  _check_enough_tokens(states.shape[1], states.shape[2])
  scores = [{"layer": i, "with_residual": linearity_score(states[i], states[i + 1])}
            for i in range(depth)]
  fits = [_affine_fit(states[i], states[i + 1]) for i in range(depth)]
  maps = {i: (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
          for i, (a, b) in enumerate(fits)}
  del states

  @jax.jit
  def sums(variables, maps, on_L, batch):
    with replaced_blocks(maps, on_L):
      logits_BxTxV = plain.apply(variables, batch["inputs"])
    return loss_fn(logits_BxTxV, batch)

  variables = _variables(params)
  curve = []
  for k in ks:
    replaced = most_linear_layers(scores, k)
    on_L = jnp.asarray([i in replaced for i in range(depth)])
    total = count = 0.0
    for batch in eval_batches:
      s, c = sums(variables, maps, on_L, {n: jnp.asarray(v) for n, v in batch.items()})
      total, count = total + float(s), count + float(c)
    curve.append({"k": k, "replaced": replaced, "loss": total / count})
  return curve


def recorded_config(workdir: str) -> Config | None:
  """The train and data sections a workdir's config.json records, as a Config (None when it is
  an experiment's own format or unreadable)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    return from_dict(Config(), {k: saved[k] for k in ("train", "data") if k in saved})
  except (OSError, ValueError, KeyError):  # ConfigError is a ValueError
    return None


def load_lm(workdir: str, mesh: jax.sharding.Mesh | None = None
            ) -> tuple[Transformer, dict, Config]:
  """(model, parameters, Config) of the newest checkpoint of a trained jaxtricks LM workdir, on
  `mesh` (default: every local device along fsdp). The parameters come as a variables dict
  {'params': ..., other collections} when the model keeps collections besides its parameters.
  A directory that is no such workdir is a one-line InitFromError."""
  try:
    source = init_from.read_source(workdir)
  except init_from.InitFromError as e:
    raise init_from.InitFromError(
        str(e).replace(f"--init_from={workdir}", f"load_lm: {workdir}")) from None
  config = recorded_config(workdir) or Config()  # an experiment's own format: the model alone
  mesh = sharding.make_mesh(sharding.MeshConfig()) if mesh is None else mesh
  dp = sharding.data_parallel_size(mesh)
  train = dataclasses.replace(config.train, init_from="",
                              batch_size=-(-config.train.batch_size // dp) * dp)
  config = dataclasses.replace(config, model=source.model, train=train)
  built = build(config, mesh)
  state = built.init_state(loaded=init_from.load(source, built))
  params = state.model_params()
  collections = getattr(state, "model_collections", dict)()
  return built.model, ({"params": params, **collections} if collections else params), config

"""Measurements the experiments share: held-out loss of given parameters under a (possibly
changed) config, and greedy decode speed of a finished run."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from jaxtricks import sharding
from jaxtricks.config import Config
from jaxtricks.data.corpus import DataConfig
from jaxtricks.data.sources import held_out_prompts, make_source
from jaxtricks.decode import generate
from jaxtricks.train.build import build


@functools.lru_cache(maxsize=4)
def eval_batches(data: DataConfig, seq_len: int, batch_size: int, n: int) -> list[dict]:
  """This process's rows of the first `n` held-out batches of `data`."""
  return make_source(data, seq_len).eval_batches(seq_len, batch_size, n, jax.process_index(),
                                                 jax.process_count())


def held_out_loss(config: Config, params, data: DataConfig | None = None) -> float:
  """Held-out next-token loss of `params` under `config`'s model (train.seq_len, batch_size and
  eval_batches) on `data`'s held-out split (default: config.data)."""
  data = config.data if data is None else data
  cfg = dataclasses.replace(config, data=data, train=dataclasses.replace(
      config.train, loss="lm", init_from=""))
  built = build(cfg)
  tc = cfg.train
  shard = sharding.batch_sharding(built.mesh)
  losses = []
  for batch in eval_batches(data, tc.seq_len, tc.batch_size, tc.eval_batches):
    batch = {k: jax.make_array_from_process_local_data(shard, v, (tc.batch_size, *v.shape[1:]))
             for k, v in batch.items()}
    losses.append(float(built.eval_step(params, batch)["loss"]))
  return float(np.mean(losses))


def decode_speed(result, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Greedy tokens/s of a finished run (jaxtricks.train.loop.RunResult) on held-out prompts,
  timed after one compiling call."""
  prompts = held_out_prompts(result.source, batch, prompt_len)
  params = jax.device_get(result.state.params)
  run = lambda: generate(result.model, params, prompts, new_tokens)  # noqa: E731
  run()
  t0 = time.perf_counter()
  out = run()
  return float(out.lengths.sum()) / (time.perf_counter() - t0)

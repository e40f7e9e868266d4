"""Decode speed and KV-cache memory of MHA, MQA and MQA-CLA2 at several context lengths.

    python -m benchmarks.attention [--contexts=256,1024,4096] [--batch=8] [--new_tokens=32]
                                   [--out=benchmarks/results/attention.json]

Multi-query attention (Shazeer 2019, arXiv 1911.02150) keeps one K/V head instead of N; Cross-Layer
Attention (Brandon et al. 2024, arXiv 2405.12981) lets groups of s layers share one layer's K/V,
so MQA-CLA2 allocates half of MQA's cache. KV bytes per token = 2 K H (K/V-producing layers)
(bytes per element); the cache bytes reported here are measured from the allocated arrays,
`cache_bytes(init_cache(config, batch, context))`.

For each variant and context C: the cache (length C + new_tokens) is filled by a real prefill of a
random C-token prompt (jitted chunks of `--prefill_chunk` tokens), then `--new_tokens` greedy tokens
are generated one per step by one jitted `lax.fori_loop` (what `jaxtricks.decode.generate` does per
step: `model.apply` with the cache, then argmax; without its stop-token bookkeeping). Every program
is compiled ahead of time, once per shape; one warm-up run precedes `--repeats` timed runs (median
reported), each restarting from the same C cached tokens. Decode on a CPU is bound by reading the
cache: every layer reads the K/V it attends to, so CLA, which saves memory, is not expected to
decode faster than MQA at equal cache reads per layer (the paper's point is memory: longer
contexts, larger batches).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from jaxtricks.decode import cache_bytes, init_cache
from jaxtricks.layers.attention import AttentionConfig
from jaxtricks.models.transformer import ModelConfig, Transformer
from jaxtricks.ops.attention import kv_bytes_per_token

flags.DEFINE_list("contexts", ["256", "1024", "4096"], "cached tokens before decoding")
flags.DEFINE_integer("batch", 8, "sequences decoded together")
flags.DEFINE_integer("new_tokens", 32, "tokens generated per timed run")
flags.DEFINE_string("out", "benchmarks/results/attention.json", "JSON output path")
flags.DEFINE_integer("repeats", 3, "timed decode runs per point (median reported)")
flags.DEFINE_integer("prefill_chunk", 256, "prompt tokens per prefill call")
flags.DEFINE_list("variants", ["MHA", "MQA", "MQA-CLA2"], "among MHA, GQA, MQA, MQA-CLA2, MQA-CLA3")
flags.DEFINE_integer("d_model", 256, "model width")
flags.DEFINE_integer("n_layers", 8, "layers")
flags.DEFINE_integer("n_heads", 8, "query heads")
FLAGS = flags.FLAGS


def variant_configs(base: ModelConfig) -> dict[str, ModelConfig]:
  """K/V heads and cross-layer sharing of each variant, on the same trunk."""
  table = {
      "MHA": dict(n_kv_heads=base.attention.n_heads),
      "GQA": dict(n_kv_heads=max(base.attention.n_heads // 2, 1)),
      "MQA": dict(n_kv_heads=1),
      "MQA-CLA2": dict(n_kv_heads=1, kv_sharing=2),
      "MQA-CLA3": dict(n_kv_heads=1, kv_sharing=3),
  }
  return {name: dataclasses.replace(base, attention=dataclasses.replace(base.attention, **kw))
          for name, kw in table.items()}


def random_params(model: Transformer, seed: int = 0) -> dict:
  """numpy normal parameters of the shapes of `model.init` (speed does not depend on them, and
  compiling `model.init` costs more than any program timed here)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)

  def fill(leaf):
    scale = 1.0 if leaf.ndim == 1 else leaf.shape[0] ** -0.5
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree.map(fill, shapes)


def seconds(fn: Callable[[], object]) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t0, out


def bench_point(cfg: ModelConfig, params: dict, context: int, batch: int, new_tokens: int,
                repeats: int, chunk: int) -> dict:
  """Prefill `context` tokens, then time greedy decoding of `new_tokens` tokens."""
  model = Transformer(cfg)
  at_context = init_cache(cfg, batch, context)
  bytes_at_context = cache_bytes(at_context)
  del at_context
  cache = init_cache(cfg, batch, context + new_tokens)
  allocated = cache_bytes(cache)

  def step(params, tokens_BxT, cache):
    logits_BxTxV, cache = model.apply({"params": params}, tokens_BxT, cache, method="decode")
    return jnp.argmax(logits_BxTxV[:, -1], -1).astype(jnp.int32), cache

  def decode(params, cache, tok_B):
    def body(i, carry):
      cache, tok_B, out_BxN = carry
      tok_B, cache = step(params, tok_B[:, None], cache)
      return cache, tok_B, out_BxN.at[:, i].set(tok_B)

    out_BxN = jnp.zeros((batch, new_tokens), jnp.int32)
    return jax.lax.fori_loop(0, new_tokens, body, (cache, tok_B, out_BxN))

  chunk = min(chunk, context)
  prompt = np.random.default_rng(context).integers(0, cfg.vocab_size, (batch, context), np.int32)
  t0 = time.perf_counter()
  compiled = {}
  for start in range(0, context, chunk):
    n = min(chunk, context - start)
    if n not in compiled:
      compiled[n] = jax.jit(step, donate_argnums=2).lower(params, prompt[:, :n], cache).compile()
  decode_c = jax.jit(decode, donate_argnums=1).lower(
      params, cache, jnp.zeros((batch,), jnp.int32)).compile()
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  for start in range(0, context, chunk):
    tok_B, cache = compiled[min(chunk, context - start)](params, prompt[:, start:start + chunk],
                                                         cache)
  jax.block_until_ready(cache)
  prefill_s = time.perf_counter() - t0

  times = []
  for r in range(repeats + 1):  # run 0 warms up
    dt, (cache, _, out_BxN) = seconds(lambda: decode_c(params, cache, tok_B))  # noqa: B023
    # Restart from the same `context` cached tokens (a new array: the old one was donated).
    cache["lengths"] = jnp.full((batch,), context, jnp.int32)
    if r:
      times.append(dt)
  step_s = statistics.median(times) / new_tokens
  return {
      "context": context, "batch": batch, "new_tokens": new_tokens,
      "kv_bytes_per_token": kv_bytes_per_token(cfg),
      "cache_bytes": bytes_at_context, "cache_bytes_allocated": allocated,
      "prefill_tokens_per_s": batch * context / prefill_s,
      "decode_tokens_per_s": batch / step_s, "decode_ms_per_step": 1e3 * step_s,
      "decode_s_runs": times, "compile_s": compile_s,
  }


def format_table(rows: list[dict]) -> str:
  head = (f"{'variant':<10}{'context':>8}{'KV B/tok':>10}{'cache MiB':>11}{'prefill tok/s':>15}"
          f"{'decode tok/s':>14}{'ms/step':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['variant']:<10}{r['context']:>8}{r['kv_bytes_per_token']:>10,}"
                 f"{r['cache_bytes'] / 2**20:>11.2f}{r['prefill_tokens_per_s']:>15,.0f}"
                 f"{r['decode_tokens_per_s']:>14,.1f}{r['decode_ms_per_step']:>9.2f}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  machine = common.machine_info()
  contexts = [int(c) for c in FLAGS.contexts]
  base = ModelConfig(vocab_size=256, d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                     attention=AttentionConfig(n_heads=FLAGS.n_heads))
  table = variant_configs(base)
  unknown = [v for v in FLAGS.variants if v not in table]
  if unknown or min(contexts) < 1 or FLAGS.batch < 1 or FLAGS.new_tokens < 1:
    raise app.UsageError(f"bad flags: unknown variants {unknown} (valid: {', '.join(table)}), "
                         "or a context / batch / new_tokens < 1")
  rows = []
  for name in FLAGS.variants:
    cfg = table[name]
    cfg.validate()
    params = random_params(Transformer(cfg))
    for context in contexts:
      r = bench_point(cfg, params, context, FLAGS.batch, FLAGS.new_tokens, FLAGS.repeats,
                      FLAGS.prefill_chunk)
      assert r["cache_bytes"] == kv_bytes_per_token(cfg) * FLAGS.batch * context
      rows.append({"variant": name, "kv_source": list(cfg.kv_source), **r})
      print(f"{name} context {context}: {r['decode_tokens_per_s']:.1f} tok/s, "
            f"{r['cache_bytes'] / 2**20:.2f} MiB", flush=True)

  print(f"\nd_model {base.d_model}, {base.n_layers} layers, {base.attention.n_heads} heads of "
        f"{base.dim_per_head}, float32, batch {FLAGS.batch}, {FLAGS.new_tokens} new tokens; "
        f"{machine['cpu_count']} CPUs, load average at start "
        f"{machine['load_average_at_start'][0]:.1f}")
  print(format_table(rows))
  out = {
      "machine": machine,
      "settings": {"contexts": contexts, "batch": FLAGS.batch, "new_tokens": FLAGS.new_tokens,
                   "repeats": FLAGS.repeats, "prefill_chunk": FLAGS.prefill_chunk},
      "model": {"d_model": base.d_model, "n_layers": base.n_layers,
                "n_heads": base.attention.n_heads, "head_dim": base.dim_per_head,
                "d_ff": base.mlp.width(base), "vocab_size": base.vocab_size, "dtype": base.dtype,
                "attn_impl": base.attention.impl},
      "cache_bytes": "cache_bytes(init_cache(config, batch, context)): allocated K/V arrays",
      "results": rows,
  }
  common.write_results(out, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

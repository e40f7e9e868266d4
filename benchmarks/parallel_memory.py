"""Per-device memory of the shard_map code, from XLA's memory analysis of the compiled programs
(nothing runs, so fake CPU devices give the figures a real mesh of that shape would):

- the vocabulary-parallel loss (jaxtricks.ops.vocab_parallel): temporary bytes of the loss and its
  gradients (x and W) per device at mesh.tensor = 1, 2, 4, against the same loss written plainly
  (full logits) and left to GSPMD with W split the same way;
- ring attention (jaxtricks.ops.ring_attention): temporary bytes of causal attention and its
  gradients (q, k, v) per device at mesh.context = 1, 2, 4, 8, against plain attention on one.

    python -m benchmarks.parallel_memory [--vocab=32768] [--seq_len=2048] [--d_model=256]
        [--batch=1] [--attn_seq_len=4096] [--heads=8] [--head_dim=64]
        [--out=benchmarks/results/parallel_memory.json]

Targets (issue 14): loss temporaries at tensor = 4 <= 0.3x those at tensor = 1 for V = 32,768,
T = 2048, d = 256; attention temporaries falling as 1/context.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import common  # noqa: E402
from jaxtricks.ops.attention import attention  # noqa: E402
from jaxtricks.ops.losses import cross_entropy  # noqa: E402
from jaxtricks.ops.ring_attention import ring_attention  # noqa: E402
from jaxtricks.ops.vocab_parallel import vocab_parallel_cross_entropy  # noqa: E402
from jaxtricks.sharding import MESH_AXES  # noqa: E402

flags.DEFINE_integer("vocab", 32768, "vocabulary size V")
flags.DEFINE_integer("seq_len", 2048, "tokens per sequence T (loss)")
flags.DEFINE_integer("d_model", 256, "model width d")
flags.DEFINE_integer("batch", 1, "sequences B")
flags.DEFINE_integer("attn_seq_len", 4096, "tokens per sequence (attention)")
flags.DEFINE_integer("heads", 8, "attention heads (query and key/value)")
flags.DEFINE_integer("head_dim", 64, "attention head dimension")
flags.DEFINE_string("out", "benchmarks/results/parallel_memory.json", "JSON output")
FLAGS = flags.FLAGS
MIB = 2 ** 20


def mesh_of(context: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
  devices = jax.devices()[:context * tensor]
  return jax.make_mesh((1, 1, context, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                       devices=devices)


def temp_bytes(fn, args, mesh, in_specs) -> int:
  shardings = tuple(NamedSharding(mesh, spec) for spec in in_specs)
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn, in_shardings=shardings).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def loss_memory() -> list[dict]:
  b, t, d, v = FLAGS.batch, FLAGS.seq_len, FLAGS.d_model, FLAGS.vocab
  f32 = jnp.float32
  args = (jax.ShapeDtypeStruct((b, t, d), f32), jax.ShapeDtypeStruct((d, v), f32),
          jax.ShapeDtypeStruct((b, t), jnp.int32))

  def split(x, w, targets):
    return jnp.mean(vocab_parallel_cross_entropy(x, w, targets, seq_axis="context")[0])

  def plain(x, w, targets):
    total, count = cross_entropy(jnp.einsum("BTD,DV->BTV", x, w), targets)
    return total / count

  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))
  specs = (P(), P(None, "tensor"), P())
  rows = []
  for tensor in (1, 2, 4):
    mesh = mesh_of(tensor=tensor)
    rows.append({"tensor": tensor,
                 "vocab_parallel_temp_bytes": temp_bytes(grad(split), args, mesh, specs),
                 "gspmd_plain_temp_bytes": temp_bytes(grad(plain), args, mesh, specs)})
  base = rows[0]["vocab_parallel_temp_bytes"]
  for row in rows:
    row["vocab_parallel_vs_tensor1"] = row["vocab_parallel_temp_bytes"] / base
  return rows


def attention_memory() -> list[dict]:
  b, t, n, h = FLAGS.batch, FLAGS.attn_seq_len, FLAGS.heads, FLAGS.head_dim
  shape = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  args = (shape, shape, shape)

  def ring(q, k, v):
    return jnp.sum(ring_attention(q, k, v))

  def plain(q, k, v):
    return jnp.sum(attention(q, k, v, causal=True))

  grad = lambda f: jax.grad(f, argnums=(0, 1, 2))
  spec = P(None, "context", None, None)
  rows = [{"context": 1, "impl": "naive",
           "temp_bytes": temp_bytes(grad(plain), args, mesh_of(), (spec,) * 3)}]
  for context in (1, 2, 4, 8):
    rows.append({"context": context, "impl": "ring",
                 "temp_bytes": temp_bytes(grad(ring), args, mesh_of(context=context),
                                          (spec,) * 3)})
  base = rows[1]["temp_bytes"]
  for row in rows:
    row["vs_ring_context1"] = row["temp_bytes"] / base
  return rows


def main(argv) -> None:
  del argv
  loss, attn = loss_memory(), attention_memory()
  print(f"vocabulary-parallel loss + gradients, B={FLAGS.batch} T={FLAGS.seq_len} "
        f"d={FLAGS.d_model} V={FLAGS.vocab}: per-device temporaries (MiB)")
  print(f"{'tensor':>6} {'vocab-parallel':>15} {'vs tensor=1':>12} {'GSPMD plain':>12}")
  for r in loss:
    print(f"{r['tensor']:>6} {r['vocab_parallel_temp_bytes'] / MIB:>15.1f} "
          f"{r['vocab_parallel_vs_tensor1']:>12.3f} {r['gspmd_plain_temp_bytes'] / MIB:>12.1f}")
  print(f"\ncausal attention + gradients, B={FLAGS.batch} T={FLAGS.attn_seq_len} "
        f"N=K={FLAGS.heads} H={FLAGS.head_dim}: per-device temporaries (MiB)")
  print(f"{'context':>7} {'impl':>6} {'MiB':>9} {'vs ring c=1':>12}")
  for r in attn:
    print(f"{r['context']:>7} {r['impl']:>6} {r['temp_bytes'] / MIB:>9.1f} "
          f"{r['vs_ring_context1']:>12.3f}")
  tensor4 = next(r for r in loss if r["tensor"] == 4)["vocab_parallel_vs_tensor1"]
  common.write_results({
      "machine": common.machine_info(),
      "settings": {k: FLAGS[k].value for k in ("vocab", "seq_len", "d_model", "batch",
                                              "attn_seq_len", "heads", "head_dim")},
      "loss": loss, "attention": attn,
      "targets": {"loss_tensor4_vs_tensor1_max": 0.3, "loss_tensor4_vs_tensor1": tensor4,
                  "loss_target_met": tensor4 <= 0.3},
  }, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

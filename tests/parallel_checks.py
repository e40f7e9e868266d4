"""Run by tests/test_parallel.py in a process with fake CPU devices: the shard_map code against its
unsharded reference, computed in this process, printed as one JSON line of largest differences.

- vocabulary-parallel cross entropy (value, accuracy, gradients of x and W) for meshes with
  tensor = 2, 4 (with data, fsdp and context axes beside it);
- ring attention (output and gradients of q, k, v) for context = 2, 4, 8, with GQA heads and with
  the heads split over tensor;
- one train step of the smoke LM (loss `lm`, tensor = 4), of the multi-token model (loss
  `mtp`, ring attention, context = 2 and tensor = 2) and of two K/V layouts (LCKV trained
  iteratively, a YOCO-like layout with sliding windows; data, fsdp and tensor = 2): metrics and new
  parameters against one device.

    python tests/parallel_checks.py
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from experiments import get_config
from jaxtricks import sharding
from jaxtricks.config import override
from jaxtricks.ops import vocab_parallel
from jaxtricks.ops.attention import attention
from jaxtricks.ops.losses import accuracy, cross_entropy
from jaxtricks.ops.ring_attention import ring_attention
from jaxtricks.ops.vocab_parallel import vocab_parallel_cross_entropy
from jaxtricks.train.build import build

jax.config.update("jax_default_matmul_precision", "highest")
# Small token chunks, so these tiny batches go through the loss's chunked forward and backward.
vocab_parallel.ROW_CHUNK = 8
AXES = sharding.MESH_AXES  # data, fsdp, context, tensor
FOUR_LAYERS = {"model.n_layers": 4}


def mesh_of(shape):
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 4,
                       devices=jax.devices()[:int(np.prod(shape))])


def max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def vocab_parallel_cases(rng) -> dict:
  b, t, d, v = 4, 8, 16, 64
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, v)) / 2, jnp.float32)
  # Half the targets are the argmax, so accuracy is neither 0 nor 1; one exact tie of two maxima.
  logits = np.einsum("btd,dv->btv", x, w)
  targets = np.where(rng.random((b, t)) < 0.5, logits.argmax(-1), rng.integers(0, v, (b, t)))
  targets = jnp.asarray(targets, jnp.int32)
  weights = jnp.asarray(rng.random((b, t)) > 0.2, jnp.float32)

  def reference(x, w):
    logits_BxTxV = jnp.einsum("BTD,DV->BTV", x, w)
    total, count = cross_entropy(logits_BxTxV, targets, weights)
    return total / count, accuracy(logits_BxTxV, targets, weights)[0] / count

  def split(x, w):
    loss_BxT, correct_BxT = vocab_parallel_cross_entropy(x, w, targets, seq_axis="context")
    count = jnp.sum(weights)
    return jnp.sum(loss_BxT * weights) / count, jnp.sum(correct_BxT * weights) / count

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (ref_loss, ref_acc), ref_g = grad(reference)(x, w)
  full = f"f32[{b},{t},{v}]"
  out = {"accuracy": float(ref_acc),
         "reference_full_logits_in_hlo": full in jax.jit(reference).lower(x, w).compile().as_text()}
  for shape in [(1, 1, 1, 2), (1, 1, 1, 4), (2, 1, 1, 4), (1, 2, 2, 2), (2, 1, 2, 2)]:
    with jax.set_mesh(mesh_of(shape)):
      (loss, acc), g = grad(split)(x, w)
      hlo = jax.jit(split).lower(x, w).compile().as_text()
    out["x".join(map(str, shape))] = {
        "loss": abs(float(loss - ref_loss)), "accuracy": abs(float(acc - ref_acc)),
        "grad": max_diff(g, ref_g),
        # The full (B, T, V) logits never exist on a device: no f32[.., 64] buffer in the HLO.
        "full_logits_in_hlo": any(f"f32[{rows},{cols},{v}]" in hlo for rows in range(1, b + 1)
                                  for cols in range(1, t + 1))}
  return out


def ring_cases(rng) -> dict:
  b, t, n, k, h = 2, 16, 4, 2, 8
  q, kk, vv = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h)))
  cot = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  ref_out = attention(q, kk, vv, causal=True)
  ref_g = jax.grad(lambda *a: jnp.sum(attention(*a, causal=True) * cot), argnums=(0, 1, 2))(
      q, kk, vv)
  out = {}
  for shape in [(1, 1, 2, 1), (1, 1, 4, 1), (1, 1, 8, 1), (2, 1, 4, 1), (1, 2, 2, 2),
                (1, 1, 4, 2)]:
    with jax.set_mesh(mesh_of(shape)):
      got = jax.jit(ring_attention)(q, kk, vv)
      g = jax.jit(jax.grad(lambda *a: jnp.sum(ring_attention(*a) * cot), argnums=(0, 1, 2)))(
          q, kk, vv)
    out["x".join(map(str, shape))] = {"out": max_diff(got, ref_out), "grad": max_diff(g, ref_g)}
  return out


def step_case(exp: str, overrides: dict, mesh_overrides: dict) -> dict:
  """One train step on one device and on the mesh: metrics and parameters after the step."""
  config = override(get_config(exp, "smoke"), overrides)
  one = build(config, mesh_of((1, 1, 1, 1)))
  sharded_config = override(config, mesh_overrides)
  many = build(sharded_config)
  rng = np.random.default_rng(0)
  tc = config.train
  tokens = rng.integers(0, config.model.vocab_size, (tc.batch_size, tc.seq_len + 1))
  batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
  results = []
  for built in (one, many):
    state = built.init_state()
    state, metrics = built.train_step(state, jax.device_put(batch, built.batch_sharding))
    results.append((jax.device_get(metrics), jax.device_get(state.params),
                    jax.device_get(state.model_collections())))
  (m1, p1, c1), (m2, p2, c2) = results
  return {"mesh": dict(many.mesh.shape), "metrics": {k: abs(float(m1[k] - m2[k])) for k in m1},
          "loss": float(m1["loss"]), "params": max_diff(p1, p2),
          "collections": max_diff(c1, c2) if c1 else None}


def main() -> None:
  """Prints the report of the default cases, or with argument `kinds` the train-step cases of
  the attention and norm kinds (the slow tier)."""
  rng = np.random.default_rng(0)
  report: dict = {"device_count": jax.device_count()}
  if sys.argv[1:] == ["kinds"]:
    split = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    report.update({
        "lckv_data2_fsdp2_tensor2": step_case(
            "lm", {**FOUR_LAYERS, "model.attention": "lckv", "model.attention.iterations": 3},
            split),
        "yoco_like_data2_fsdp2_tensor2": step_case(
            "lm", {**FOUR_LAYERS, "model.attention.kv_layout": (0, 1, 2, 2),
                   "model.attention.window": 8, "model.attention.window_layers": (0, 1)},
            split),
        "prepbn_data2_fsdp2_tensor2": step_case("lm", {"model.norm": "prepbn"}, split),
        "linear_attention_data2_fsdp2_tensor2": step_case(
            "lm", {"model.attention": "linear", "model.attention.n_kv_heads": 1,
                   "model.attention.chunk": 16}, split),
    })
  else:
    report.update({
        "vocab_parallel": vocab_parallel_cases(rng),
        "ring": ring_cases(rng),
        "lm_tensor4": step_case("lm", {}, {"mesh.fsdp": 2, "mesh.tensor": 4}),
        "mtp_ring_context2_tensor2": step_case("mtp", {"model.attention.impl": "ring"},
                                               {"mesh.fsdp": 2, "mesh.context": 2,
                                                "mesh.tensor": 2}),
    })
  print(json.dumps(report))


if __name__ == "__main__":
  main()

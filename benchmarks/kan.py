"""KAN layer and network forward+backward against peers and the FLOP floor (Liu et al. 2024,
arXiv 2404.19756; issue 5 of this project).

    python -m benchmarks.kan [--out=benchmarks/results/kan.json] [--reps=10]

Times one training-style step, forward and backward with gradients of the parameters and of the
input, for
  - `layer`: one KAN layer, batch 1024, 512 -> 512, G = 5, k = 3 (pykan's silu base branch plus
    the B-spline branch), and a dense layer of the same shape;
  - `network`: a [2, 5, 1] KAN (pykan's hellokan network), batch 1024, G = 5, k = 3;
each with
  - jaxtricks `KANLayer` / `KAN`: the default, whose uniform grid takes the closed-form features
    [bases, silu] of `ops.kan_uniform` in one fused pass each way; the Cox-de Boor recursion with
    the analytic custom-VJP backward (`closed_form=False`, the path of grids moved by updates);
    and autodiff through the recursion (`analytic_grad=False`);
  - the layer's three matmuls alone (forward, and the two backward ones) at its shapes, and a
    dense layer (JAX) and dense layers in PyTorch, for scale;
  - efficient-kan's matmul formulation (bases (N, I (G + k)) @ (I (G + k), O) plus
    silu(x) W_b), written here in plain PyTorch;
  - pykan's `KANLayer` / `MultKAN` and jaxKAN's `SplineLayer` / `KAN` (layer_type 'spline'), both
    from the package index (`pip install -e ".[bench]"`); a peer that is missing or fails is
    recorded with its reason instead of a time.

FLOP floor: the matmul form costs 2 N I O (G + k + 1) FLOPs forward (the G + k basis columns and
the silu column) and twice that backward (parameter and input gradients), 6 N I O (G + k + 1) in
all. The floor is that count divided by the best float32 matmul rate of this run (a 2048^3 matmul
timed before, between and after the implementations, as in benchmarks/train_step.py), so it is
the time of the matmuls alone at the machine's peak. Targets (issue 5): the layer within 1.3x of
the floor and at least 2x faster than the efficient-kan formulation. PyTorch peers run in a
subprocess each (see `torch_in_subprocess`). On a shared CPU, repeat the run: the ratios between
implementations move less than the absolute times.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from jaxtricks.layers.kan import KANLayer
from jaxtricks.models.kan import KAN

flags.DEFINE_string("out", "benchmarks/results/kan.json", "JSON output path")
flags.DEFINE_integer("reps", 10, "timed repetitions per implementation (3 for any over 1 s)")
flags.DEFINE_integer("matmul_n", 2048, "size of the square reference matmul")
flags.DEFINE_string("worker", "", "internal: time one PyTorch implementation, 'CASE/IMPL'")
FLAGS = flags.FLAGS

CASES = {"layer": dict(batch=1024, widths=(512, 512), grid=5, order=3),
         "network": dict(batch=1024, widths=(2, 5, 1), grid=5, order=3)}
REFERENCE = "efficient-kan formulation (torch)"
WARMUP = 2


def _pairs(widths) -> list[tuple[int, int]]:
  return list(zip(widths[:-1], widths[1:], strict=True))


def kan_flops(batch: int, widths: tuple[int, ...], grid: int, order: int) -> int:
  """6 N sum_l I_l O_l (G + k + 1): forward and both backward matmuls of the matmul form."""
  return sum(6 * batch * i * o * (grid + order + 1) for i, o in _pairs(widths))


def seconds(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def time_steps(step: Callable[[], object], reps: int) -> dict:
  """Warm-up (compilation), then `reps` timed steps (3, after no further warm-up, if one step
  takes over a second)."""
  first = seconds(step)
  if first > 1.0:
    reps = min(reps, 3)
  else:
    for _ in range(WARMUP - 1):
      seconds(step)
  times = [seconds(step) for _ in range(reps)]
  return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps,
          "first_s": first}


# --- JAX implementations: jitted value-and-gradient of sum(y * g) w.r.t. parameters and input.

def _jax_step(loss: Callable, params, x) -> Callable[[], object]:
  # The loss value too, as a training step needs it: with jax.grad alone XLA drops the last
  # layer's forward matmul (sum(y * g) is linear in y), which the PyTorch peers always run.
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda: jax.block_until_ready(step(params, x))


def _inputs(case: dict):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (case["batch"], case["widths"][0])).astype(np.float32)
  g = rng.normal(size=(case["batch"], case["widths"][-1])).astype(np.float32)
  return x, g


def jaxtricks_step(case: dict, analytic_grad: bool, closed_form: bool = True
                   ) -> Callable[[], object]:
  x, g = map(jnp.asarray, _inputs(case))
  widths = case["widths"]
  kw = dict(grid_size=case["grid"], order=case["order"], analytic_grad=analytic_grad,
            closed_form=closed_form)
  model = KANLayer(widths[1], **kw) if len(widths) == 2 else KAN(tuple(widths), **kw)
  variables = nn.unbox(model.init(jax.random.key(0), x[:1]))
  grid = variables.get("grid", {})
  loss = lambda p, x: jnp.sum(model.apply({"params": p, "grid": grid}, x) * g)
  return _jax_step(loss, variables["params"], x)


def dense_step(case: dict) -> Callable[[], object]:
  x, g = map(jnp.asarray, _inputs(case))
  widths = case["widths"]
  rng = np.random.default_rng(1)
  params = [(jnp.asarray(rng.normal(size=(i, o)) / np.sqrt(i), jnp.float32), jnp.zeros(o))
            for i, o in _pairs(widths)]

  def loss(params, x):
    for layer, (w, b) in enumerate(params):
      x = x @ w + b
      x = jax.nn.silu(x) if layer < len(params) - 1 else x
    return jnp.sum(x * g)
  return _jax_step(loss, params, x)


def matmuls_step(case: dict) -> Callable[[], object]:
  """The matmul form's three matmuls alone at the case's shapes: forward features @ C, and
  backward features^T @ dy and dy @ C^T (what the FLOP floor counts, at this shape's rate)."""
  rng = np.random.default_rng(2)
  n, j = case["batch"], case["grid"] + case["order"] + 1
  mats = [(jnp.asarray(rng.normal(size=(n, j * i)), jnp.float32),
           jnp.asarray(rng.normal(size=(j * i, o)), jnp.float32),
           jnp.asarray(rng.normal(size=(n, o)), jnp.float32)) for i, o in _pairs(case["widths"])]
  three = jax.jit(lambda mats: [(f @ c, f.T @ g, g @ c.T) for f, c, g in mats])
  return lambda: jax.block_until_ready(three(mats))


def jaxkan_step(case: dict) -> Callable[[], object]:
  from flax import nnx  # noqa: PLC0415 (jaxkan is an optional peer)
  from jaxkan.models.KAN import KAN as JaxKAN  # noqa: PLC0415

  x, g = map(jnp.asarray, _inputs(case))
  model = JaxKAN(list(case["widths"]), layer_type="spline",
                 required_parameters={"k": case["order"], "G": case["grid"]})
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) * g)
  return _jax_step(loss, params, x)


# --- PyTorch implementations: backward of sum(y * g) with x.requires_grad.

def _torch_step(module, case: dict) -> Callable[[], object]:
  import torch  # noqa: PLC0415 (torch is an optional peer)

  x_np, g_np = _inputs(case)
  x = torch.from_numpy(x_np).requires_grad_(True)
  g = torch.from_numpy(g_np)

  def step():
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    (y * g).sum().backward()
    return x.grad
  return step


def torch_matmul_kan(case: dict):
  """efficient-kan's formulation (Blealtan's efficient-kan), written here from its description in
  KAN.md: per-input knots, Cox-de Boor bases (N, I, G + k) flattened against a scaled
  coefficient matrix, plus a silu base branch; two nn.Linear-style matmuls per layer."""
  import torch  # noqa: PLC0415

  class MatmulKANLinear(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int, grid: int, order: int):
      super().__init__()
      h = 2.0 / grid
      knots = -1.0 + h * torch.arange(-order, grid + order + 1, dtype=torch.float32)
      self.register_buffer("knots", knots.expand(n_in, -1).contiguous())
      self.order = order
      bound = n_in ** -0.5
      self.w_base = torch.nn.Parameter(torch.empty(n_out, n_in).uniform_(-bound, bound))
      self.coef = torch.nn.Parameter(torch.empty(n_out, n_in, grid + order).uniform_(-0.01, 0.01))
      self.scaler = torch.nn.Parameter(torch.empty(n_out, n_in).uniform_(-bound, bound))

    def bases(self, x):
      t, u = self.knots, x.unsqueeze(-1)
      b = ((u >= t[:, :-1]) & (u < t[:, 1:])).to(x.dtype)
      for p in range(1, self.order + 1):
        b = ((u - t[:, :-(p + 1)]) / (t[:, p:-1] - t[:, :-(p + 1)]) * b[..., :-1]
             + (t[:, p + 1:] - u) / (t[:, p + 1:] - t[:, 1:-p]) * b[..., 1:])
      return b

    def forward(self, x):
      w = (self.coef * self.scaler.unsqueeze(-1)).reshape(self.coef.shape[0], -1)
      return (torch.nn.functional.linear(torch.nn.functional.silu(x), self.w_base)
              + torch.nn.functional.linear(self.bases(x).reshape(x.shape[0], -1), w))

  widths = case["widths"]
  return torch.nn.Sequential(*[MatmulKANLinear(i, o, case["grid"], case["order"])
                               for i, o in _pairs(widths)])


def torch_dense(case: dict):
  import torch  # noqa: PLC0415

  widths = case["widths"]
  layers = []
  for i, o in _pairs(widths):
    layers += [torch.nn.Linear(i, o), torch.nn.SiLU()]
  return torch.nn.Sequential(*layers[:-1])


def pykan_module(case: dict):
  import torch  # noqa: PLC0415

  widths = case["widths"]
  if len(widths) == 2:
    from kan.KANLayer import KANLayer as PyKANLayer  # noqa: PLC0415 (pykan is an optional peer)

    return PyKANLayer(in_dim=widths[0], out_dim=widths[1], num=case["grid"], k=case["order"])
  from kan import MultKAN  # noqa: PLC0415

  model = MultKAN(width=list(widths), grid=case["grid"], k=case["order"], auto_save=False,
                  device="cpu")
  model.save_act = False       # no activation caching for plots: a plain training step
  model.symbolic_enabled = False
  torch.manual_seed(0)
  return model


JAX_IMPLS: dict[str, Callable[[dict], Callable[[], object]]] = {
    "jaxtricks closed form (uniform grid)": lambda c: jaxtricks_step(c, analytic_grad=True),
    "jaxtricks recursion, custom VJP": lambda c: jaxtricks_step(c, True, closed_form=False),
    "jaxtricks autodiff": lambda c: jaxtricks_step(c, analytic_grad=False),
    "its 3 matmuls alone (jax)": matmuls_step,
    "dense (jax)": dense_step,
    "jaxkan (spline layer)": jaxkan_step,
}
TORCH_IMPLS: dict[str, Callable[[dict], object]] = {
    REFERENCE: torch_matmul_kan,
    "dense (torch)": torch_dense,
    "pykan": pykan_module,
}


def measure(make: Callable[[], Callable[[], object]]) -> dict:
  try:
    return {"status": "ok", **time_steps(make(), FLAGS.reps)}
  except ImportError as e:
    return {"status": "not installed", "reason": f"{type(e).__name__}: {e}"}
  except Exception as e:  # a failing peer is a result, not a crash
    return {"status": "failed", "reason": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc(limit=3)}


def torch_in_subprocess(case: str, impl: str) -> dict:
  """PyTorch peers run in their own process: XLA's worker threads keep spinning for a while after
  each JAX computation and, in one process, slowed PyTorch's steps about 2x on 2 cores. OpenMP
  threads wait passively (OMP_WAIT_POLICY): on a shared 2-core machine spinning ones made the
  efficient-kan step about 3x slower and a [2, 5, 1] step 200x slower in our runs."""
  env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.kan", f"--worker={case}/{impl}",
                         f"--reps={FLAGS.reps}"], capture_output=True, text=True, check=False,
                        env=env, cwd=root)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"status": "failed", "reason": f"worker exited {proc.returncode}: "
          f"{proc.stderr.strip()[-300:]}"}


def worker(spec: str) -> None:
  try:
    import torch  # noqa: PLC0415 (torch is an optional peer)
  except ImportError as e:
    print("RESULT " + json.dumps({"status": "not installed", "reason": f"{type(e).__name__}: {e}"}),
          flush=True)
    return

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  case, impl = spec.split("/", 1)
  result = measure(lambda: _torch_step(TORCH_IMPLS[impl](CASES[case]), CASES[case]))
  print("RESULT " + json.dumps(dict(result, torch=torch.__version__)), flush=True)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.worker:
    worker(FLAGS.worker)
    return
  n = FLAGS.matmul_n
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  matmul = lambda: jax.block_until_ready(mm(a, a))
  for _ in range(WARMUP):
    matmul()
  mm_times = [seconds(matmul) for _ in range(5)]
  results: dict[str, dict] = {}
  for name, case in CASES.items():
    results[name] = {"config": {**case, "widths": list(case["widths"])},
                     "flops": kan_flops(**case), "impls": {}}
    runs = [(impl, lambda make=make, case=case: measure(lambda: make(case)))
            for impl, make in JAX_IMPLS.items()]
    runs += [(impl, lambda impl=impl, name=name: torch_in_subprocess(name, impl))
             for impl in TORCH_IMPLS]
    for impl, run in runs:
      r = results[name]["impls"][impl] = run()
      mm_times += [seconds(matmul) for _ in range(3)]
      print(f"{name:8s} {impl:34s} " + (f"{r['median_s'] * 1e3:10.2f} ms" if r["status"] == "ok"
                                         else f"{r['status']}: {r['reason'][:80]}"), flush=True)
  peak = 2 * n ** 3 / min(mm_times)
  torch_version = None
  for res in results.values():
    res["floor_s"] = res["flops"] / peak
    ref = res["impls"].get(REFERENCE, {})
    for r in res["impls"].values():
      torch_version = r.pop("torch", torch_version)
      if r["status"] != "ok":
        continue
      r["ratio_to_floor"] = r["median_s"] / res["floor_s"]
      if ref.get("status") == "ok":
        r["speedup_vs_reference"] = ref["median_s"] / r["median_s"]
  print_table(results, peak)
  out = {"machine": common.machine_info(), "torch": torch_version,
         "matmul": {"n": n, "dtype": "float32", "peak_flops_per_s": peak,
                    "median_flops_per_s": 2 * n ** 3 / statistics.median(mm_times),
                    "reps": len(mm_times)},
         "flops_formula": "6 * N * sum(I * O) * (G + k + 1): matmul form, forward + backward",
         "reference": REFERENCE, "torch_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY",
                                                                        "PASSIVE"),
         "targets": {"layer_ratio_to_floor": 1.3, "layer_speedup_vs_reference": 2.0},
         "cases": results}
  common.write_results(out, FLAGS.out)


def print_table(results: dict, peak: float) -> None:
  print(f"float32 matmul {FLAGS.matmul_n}^3, best of the run: {peak / 1e9:.1f} GFLOP/s")
  head = f"{'case':<9}{'implementation':<36}{'median ms':>10}{'min ms':>9}{'x floor':>9}" \
         f"{'x faster than ' + 'ref':>18}"
  print(head)
  print("-" * len(head))
  for name, res in results.items():
    print(f"{name:<9}{'FLOP floor':<36}{res['floor_s'] * 1e3:>10.3f}")
    for impl, r in res["impls"].items():
      if r["status"] != "ok":
        print(f"{name:<9}{impl:<36}{r['status']}: {r['reason'][:60]}")
        continue
      print(f"{name:<9}{impl:<36}{r['median_s'] * 1e3:>10.2f}{r['min_s'] * 1e3:>9.2f}"
            f"{r['ratio_to_floor']:>9.2f}{r.get('speedup_vs_reference', float('nan')):>18.2f}")


if __name__ == "__main__":
  app.run(main)

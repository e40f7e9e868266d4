"""Helpers shared by the tests: subprocess launches, metrics files, a small text corpus.

Speed on a 2-core CPU comes from three things:
- XLA's backend (LLVM) optimisation level 0: compiles about twice as fast and tiny models still
  run fast (unless XLA_FLAGS already chooses a level);
- a persistent compilation cache in a directory private to this test session (cold at every
  session), shared by the test process and every subprocess, so one program compiles once;
- one `launch.py --preset=smoke` run shared by every test that needs a finished run (conftest).

Subprocesses run on the CPU platform with `--xla_force_host_platform_device_count` set as each
test asks: the device count is fixed when JAX initialises, so several devices need a new process.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# Only programs that take this long to compile are cached (not every small op run eagerly).
CACHE_MIN_COMPILE_S = 0.5
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_OPT_LEVEL_FLAG = "--xla_backend_optimization_level"

# Fake CPU devices of the sharded tests' processes (conftest's --fake_devices, fixture
# `fake_devices`); the test process itself has one.
FAKE_DEVICES = 8

# The flags of the shared smoke run (conftest.smoke_run), as flags and as config overrides.
SMOKE_FLAGS = ("--exp=lm", "--preset=smoke", "--steps=6", "--log_every=1", "--ckpt_every=3")
SMOKE_OVERRIDES = {"train.steps": 6, "train.log_every": 1, "train.ckpt_every": 3}

@functools.cache
def cache_dir() -> str:
  """This session's persistent compilation cache (created on first use, removed by conftest)."""
  return tempfile.mkdtemp(prefix="jaxtricks-tests-xla-cache-")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS of the environment without its device count, plus the fast-compile level and
  `devices` host devices if given."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(_DEVICE_COUNT_FLAG)]
  if not any(f.startswith(_OPT_LEVEL_FLAG) for f in flags):
    flags.append(f"{_OPT_LEVEL_FLAG}=0")
  if devices:
    flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
  return " ".join(flags)


def subprocess_env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=xla_flags(devices if devices > 1 else None),
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=cache_dir(),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(CACHE_MIN_COMPILE_S),
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
  )
  return env


def run_python(args: list[str], devices: int = 1, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python ARGS` in the repository root with `devices` CPU devices (and `env` added); captures
  text output."""
  return subprocess.run([sys.executable, *args], cwd=REPO,
                        env={**subprocess_env(devices), **(env or {})},
                        capture_output=True, text=True, timeout=timeout)


def launch(*flags: str, devices: int = 1) -> subprocess.CompletedProcess:
  return run_python(["launch.py", *flags], devices=devices)


def describe(proc: subprocess.CompletedProcess) -> str:
  return (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
          f"--- stderr\n{proc.stderr[-5000:]}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_records(records: list[dict]) -> list[dict]:
  """The per-step training records of a metrics.jsonl (evaluation records hold val_* only)."""
  return [r for r in records if "loss" in r]


def val_records(records: list[dict]) -> list[dict]:
  return [r for r in records if "val_loss" in r]


def duplicated_steps(records: list[dict]) -> list[tuple[str, int]]:
  """(kind, step) pairs logged more than once, kind 'train' or 'val'."""
  seen, dups = set(), []
  for r in records:
    key = ("train" if "loss" in r else "val", r["step"])
    if key in seen:
      dups.append(key)
    seen.add(key)
  return dups


def write_text_corpus(directory: pathlib.Path, n_files: int = 24, n_bytes: int = 3000,
                      seed: int = 0) -> str:
  """Deterministic pseudo-text files in three subfolders; returns a recursive glob for them."""
  rng = np.random.default_rng(seed)
  alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      \n.,", np.uint8)
  for i in range(n_files):
    sub = directory / f"part{i % 3}"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / f"doc{i:03d}.txt").write_bytes(rng.choice(alphabet, n_bytes).tobytes())
  return str(directory / "**" / "*.txt")


def launch_process(*flags: str, devices: int = 1, env: dict[str, str] | None = None
                   ) -> subprocess.Popen:
  """`python launch.py FLAGS` started in the background (for signals, several processes)."""
  full_env = subprocess_env(devices)
  full_env.update(env or {})
  return subprocess.Popen([sys.executable, "launch.py", *flags], cwd=REPO, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
  """Reads proc's stderr until a line containing `text`; returns the lines read (the process
  keeps running). Raises AssertionError if it exits or times out first."""
  import time  # noqa: PLC0415

  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line:
      raise AssertionError(f"exited before {text!r}:\n{''.join(lines)[-3000:]}")
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(lines)[-3000:]}")


def free_port() -> int:
  import socket  # noqa: PLC0415

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def file_digests(directory: str | os.PathLike) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory` (to show nothing was changed)."""
  import hashlib  # noqa: PLC0415

  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def arrays_equal(a, b) -> bool:
  """Exact equality of two pytrees of arrays: chex's assert_trees_all_equal, strict (same
  structure, shapes, dtypes and values; NaN equals NaN in the same place), as a bool."""
  import chex  # noqa: PLC0415

  try:
    chex.assert_trees_all_equal(a, b, strict=True)
  except AssertionError:
    return False
  return True


def launch_limited(*flags: str, file_size_limit: int, devices: int = 1
                   ) -> subprocess.CompletedProcess:
  """launch.py under RLIMIT_FSIZE: writing a file past `file_size_limit` bytes fails (EFBIG), as
  on a full disk (Python ignores SIGXFSZ), whoever runs the tests. The limit is set by the child
  itself (no fork-time hook in this multithreaded process). The temporary directory stays usable
  (a full workdir disk, not a full /tmp): absl.testing (imported by chex) is given it through
  TEST_TMPDIR instead of probing it with a write."""
  code = ("import resource, runpy, sys; "
          f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); "
          "sys.argv = ['launch.py', *sys.argv[1:]]; "
          "runpy.run_path('launch.py', run_name='__main__')")
  return run_python(["-c", code, *flags], devices=devices,
                    env={"TEST_TMPDIR": tempfile.gettempdir()})


def random_params(model, tokens, seed: int = 0) -> dict:
  """Parameters of a Transformer `model` with numpy normal values (norm scales around 1, kernels
  scaled by 1/sqrt(fan-in)), for tests that need weights far from the small init."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      x = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
    elif name == "embedding":
      x = rng.standard_normal(leaf.shape)
    elif len(leaf.shape) <= 1:  # a bias, a scalar gain or other vector of an adapter
      x = 0.1 * rng.standard_normal(leaf.shape)
    else:  # a Linear kernel; the output projection `o` contracts two axes (heads, head_dim)
      fan_in = leaf.shape[0] * (leaf.shape[1] if path[-2].key == "o" else 1)
      x = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def readme_summary_keys(exp: str) -> list[str]:
  """The backticked names in the summary column of README's experiments table, row `exp`."""
  for line in (REPO / "README.md").read_text().splitlines():
    if line.startswith(f"| `{exp}` |"):
      return re.findall(r"`([^`]+)`", line.strip("|").split("|")[2])
  raise AssertionError(f"README's experiments table has no row for {exp!r}")


def _has_path(tree, path: list[str]) -> bool:
  """Whether the dotted `path` starts at any depth of `tree` (dicts, and lists of dicts)."""
  if isinstance(tree, list):
    return any(_has_path(x, path) for x in tree)
  if not isinstance(tree, dict):
    return False
  if path[0] in tree:
    rest, node = path[1:], tree[path[0]]
    if not rest or (isinstance(node, dict) and _has_path_here(node, rest)):
      return True
  return any(_has_path(v, path) for v in tree.values())


def _has_path_here(tree: dict, path: list[str]) -> bool:
  node = tree
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return False
    node = node[key]
  return True


def assert_readme_summary_keys(summary: dict, exp: str, absent_ok: tuple[str, ...] = ()) -> None:
  """Every summary key README lists for `exp` is in `summary` (nested keys at any depth, dotted
  names as paths); preset names and `absent_ok` (keys of other presets) are skipped."""
  from experiments import load  # noqa: PLC0415

  skip = set(load(exp).PRESETS) | set(absent_ok)
  keys = readme_summary_keys(exp)
  assert keys, f"README lists no summary keys for {exp!r}"
  missing = [k for k in keys if k not in skip and not _has_path(summary, k.split("."))]
  assert not missing, f"{exp}: README lists {missing}, not in the summary"


def final_state_difference(workdir_a, workdir_b, step: int = 6) -> float:
  """Largest absolute difference of the train states saved at `step` (params, Adam moments)."""
  import chex  # noqa: PLC0415
  import jax  # noqa: PLC0415

  from jaxtricks import checkpoint  # noqa: PLC0415

  a, b = (checkpoint.read_numpy(pathlib.Path(w) / "checkpoints", step)
          for w in (workdir_a, workdir_b))
  chex.assert_trees_all_equal_shapes(a, b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_resumed_like_uninterrupted(resumed, reference) -> None:
  """Steps 4-6 trained after the resume give the uninterrupted run's losses (same data order)
  and final state, within float32 reduction-order noise."""
  got = train_records(read_jsonl(pathlib.Path(resumed) / "metrics.jsonl"))
  ref = train_records(read_jsonl(pathlib.Path(reference) / "metrics.jsonl"))
  assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5)
  assert final_state_difference(resumed, reference) < 1e-5

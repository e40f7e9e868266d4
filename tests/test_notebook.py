"""The Colab quickstart, notebooks/quickstart.ipynb: a valid, cleared notebook whose code cells
compile (default tier, no kernel), and executed headlessly with nbclient at the smoke preset on
the CPU (slow tier: about a minute on 2 cores)."""

from __future__ import annotations

import math
import re

import jax
import pytest

from tests import support

NOTEBOOK = support.REPO / "notebooks" / "quickstart.ipynb"
CELL_IDS = ("install", "parameters", "devices", "train", "speculative", "head-losses", "kan")
CELL_TIMEOUT_S = 600


def python_source(source: str) -> str:
  """A code cell's source with IPython shell (`!`) and magic (`%`) lines replaced by `pass` at
  the same indentation, so that the rest compiles as plain Python."""
  lines = []
  for line in source.splitlines():
    stripped = line.lstrip()
    if stripped.startswith(("!", "%")):
      line = line[:len(line) - len(stripped)] + "pass"
    lines.append(line)
  return "\n".join(lines)


def test_python_source_strips_shell_and_magic_lines():
  source = "%matplotlib inline\nif True:\n  !pip install x\nx = 1"
  assert python_source(source) == "pass\nif True:\n  pass\nx = 1"


def test_notebook_is_valid_cleared_and_compiles():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  # Stored as nbformat writes it (one key order, one indentation), with a final newline.
  assert NOTEBOOK.read_text() == nbformat.writes(nb) + "\n"
  ids = [c.id for c in nb.cells]
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.id for c in code] == list(CELL_IDS)
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, f"{cell.id}: outputs not cleared"
    assert nb.cells[ids.index(cell.id) - 1].cell_type == "markdown", f"{cell.id}: no lead"
    compile(python_source(cell.source), f"quickstart.ipynb:{cell.id}", "exec")


def _stdout(cell) -> str:
  return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _images(cell) -> int:
  return sum("image/png" in o.get("data", {}) for o in cell.outputs
             if o.output_type == "display_data")


def _is_png(path) -> bool:
  return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  from ipykernel.kernelspec import write_kernel_spec  # noqa: PLC0415
  from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415
  from jupyter_client.manager import AsyncKernelManager  # noqa: PLC0415

  # A python3 kernel of this interpreter, whatever kernels the machine has installed.
  kernels = tmp_path / "kernels"
  write_kernel_spec(str(kernels / "python3"))
  km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(
      kernel_dirs=[str(kernels)], ensure_native_kernel=False))
  workdir = tmp_path / "work"
  env = support.subprocess_env()  # CPU, fast compiles, this session's compilation cache
  env.update(JAXTRICKS_NOTEBOOK_PRESET="smoke", JAXTRICKS_NOTEBOOK_KAN_PRESET="smoke",
             JAXTRICKS_NOTEBOOK_WORKDIR=str(workdir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(support.REPO)}})
  try:
    client.execute(env=env)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"a notebook cell failed:\n{str(e)[-6000:]}")
  cells = {c.id: c for c in nb.cells}
  assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]

  devices = re.search(r"^\| (\w+) \| (\d+) \| .* \| (.*) \|$", _stdout(cells["devices"]), re.M)
  assert devices, _stdout(cells["devices"])
  assert devices.groups() == ("cpu", "1", str(jax.devices("cpu")[0]))

  # The printed head losses are the run's final evaluation, as metrics.jsonl logged it.
  heads = 4  # the smoke preset's n
  final_val = support.val_records(support.read_jsonl(workdir / "mtp" / "metrics.jsonl"))[-1]
  rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", _stdout(cells["train"]), re.M)
  assert [int(r[0]) for r in rows] == list(range(1, heads + 1)), _stdout(cells["train"])
  for i, loss, acc in rows:
    assert math.isclose(float(loss), final_val[f"val_loss_head{i}"], abs_tol=1e-4)
    assert math.isclose(float(acc), final_val[f"val_accuracy_head{i}"], abs_tol=1e-4)

  spec = _stdout(cells["speculative"])
  assert "identical to greedy: True" in spec, spec
  tokens_per_forward = float(re.search(r"tokens per forward pass: ([\d.]+)", spec).group(1))
  assert 1.0 <= tokens_per_forward <= heads, spec
  acceptance = re.search(r"acceptance per draft position: (.*)", spec).group(1).split()
  assert len(acceptance) == heads - 1 and all(0 <= float(a) <= 1 for a in acceptance), spec
  passes = re.search(r"forward passes: greedy (\d+), speculative (\d+)", spec)
  assert int(passes.group(2)) <= int(passes.group(1)), spec

  for png in ("mtp/head_losses.png", "kan/kan_grid_extension.png", "kan/kan_pruned.png"):
    assert _is_png(workdir / png), png
  assert _images(cells["head-losses"]) == 1
  assert _images(cells["kan"]) == 2

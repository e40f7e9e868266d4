"""jaxtricks.tensorboard: crc32c, and event files read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from jaxtricks import tensorboard as tb
from tests import support


def _crc32c_bitwise(data: bytes) -> int:
  """CRC-32C one bit at a time, without a table."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _png(width: int, height: int) -> bytes:
  """An 8-bit RGB PNG made with zlib: a colour gradient."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (40 * x, 60 * y, 128))
                  for y in range(height))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
          + chunk(b"IEND", b""))


def _event_files(folder) -> list:
  return sorted(p for p in folder.iterdir() if p.name.startswith("events.out.tfevents."))


def _load(folder) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
  acc.Reload()
  return acc


def test_crc32c_check_values_and_bitwise_reference():
  # The CRC catalogue's check value and RFC 3720 (iSCSI) appendix B.4's test vectors.
  assert tb.crc32c(b"123456789") == 0xE3069283
  assert tb.crc32c(b"") == 0
  assert tb.crc32c(bytes(32)) == 0x8A9136AA
  assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tb.crc32c(bytes(range(32))) == 0x46DD794E
  assert tb.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
  rng = np.random.default_rng(0)
  for n in (1, 7, 64, 1000):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tb.crc32c(data) == _crc32c_bitwise(data)
    assert tb.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


def test_png_size_reads_the_ihdr_chunk():
  matplotlib_image = pytest.importorskip("matplotlib.image")
  png = _png(5, 3)
  assert matplotlib_image.imread(io.BytesIO(png)).shape == (3, 5, 3)  # a valid 5x3 RGB PNG
  assert tb.png_size(png) == (5, 3, 3)
  with pytest.raises(ValueError, match="not a PNG"):
    tb.png_size(b"GIF89a" + bytes(30))


def test_scalars_and_image_read_back_by_tensorboard(tmp_path):
  png = _png(5, 3)
  with tb.EventWriter(str(tmp_path)) as writer:
    writer.scalars(1, {"loss": 2.5, "lr": np.float32(1e-3), "count": 7, "nan": math.nan,
                       "inf": -math.inf, "name": "lm", "none": None, "flag": True})
    writer.scalars(2, {"loss": 1.25, "lr": 2e-3})
    writer.image("figure", 2, png)
  (path,) = _event_files(tmp_path)
  first = next(iter(event_file_loader.LegacyEventFileLoader(str(path)).Load()))
  assert first.file_version == "brain.Event:2"

  acc = _load(tmp_path)
  assert sorted(acc.Tags()["scalars"]) == ["count", "loss", "lr"]  # non-finite, non-numeric out
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.25)]
  assert [(e.step, e.value) for e in acc.Scalars("lr")] == [
      (1, float(np.float32(1e-3))), (2, float(np.float32(2e-3)))]
  assert [(e.step, e.value) for e in acc.Scalars("count")] == [(1, 7.0)]
  (image,) = acc.Images("figure")
  assert (image.step, image.width, image.height, image.encoded_image_string) == (2, 5, 3, png)


def test_restart_step_drops_what_earlier_files_logged_from_there(tmp_path):
  """A resumed run (restart at step 3) replaces steps 3 and 4 of the first run's file."""
  with tb.EventWriter(str(tmp_path), restart_step=0) as first:
    for step in range(1, 5):
      first.scalars(step, {"loss": float(step)})
  with tb.EventWriter(str(tmp_path), restart_step=3) as resumed:
    for step in (3, 4):
      resumed.scalars(step, {"loss": 10.0 * step})
  assert len(_event_files(tmp_path)) == 2
  assert [(e.step, e.value) for e in _load(tmp_path).Scalars("loss")] == [
      (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(tb, "is_writer", lambda: False)
  writer = tb.EventWriter(str(tmp_path / "tb"))
  writer.scalars(1, {"loss": 1.0})
  writer.image("figure", 1, _png(2, 2))
  writer.close()
  assert not (tmp_path / "tb").exists()


def test_tensorboard_run_mirrors_metrics_jsonl_and_figures(tmp_path):
  """`launch.py --train.tensorboard=true`: scalars equal metrics.jsonl's, loss.png an image."""
  workdir = tmp_path / "run"
  proc = support.launch(*support.SMOKE_FLAGS, "--train.tensorboard=true", f"--workdir={workdir}")
  assert proc.returncode == 0, support.describe(proc)
  records = support.read_jsonl(workdir / "metrics.jsonl")
  figures = (workdir / "loss.png").exists()  # drawn where matplotlib is installed
  assert len(_event_files(workdir)) == 1 + figures  # the run's scalars, then its figures
  acc = _load(workdir)

  expected: dict[str, list] = {}
  for record in records:
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        expected.setdefault(key, []).append((record["step"], float(np.float32(value))))
  assert {"loss", "grad_norm", "lr", "val_loss", "tokens_per_s"} <= set(expected)
  assert sorted(acc.Tags()["scalars"]) == sorted(expected)
  for key, points in expected.items():
    assert [(e.step, e.value) for e in acc.Scalars(key)] == points, key

  if not figures:
    return
  png = (workdir / "loss.png").read_bytes()
  (image,) = acc.Images("loss")
  import matplotlib.image  # noqa: PLC0415 (optional)

  height, width = matplotlib.image.imread(io.BytesIO(png)).shape[:2]
  assert (image.step, image.width, image.height) == (6, width, height)
  assert image.encoded_image_string == png

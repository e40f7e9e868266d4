"""TensorBoard event files without TensorFlow: scalars and PNG images (process 0 only).

An event file is a sequence of TFRecords, each holding one serialised `Event` protobuf message:

    record = uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian; masked(c) = rotate_right(c, 15) + 0xa282ead8 mod 2^32). The first event carries
`file_version: "brain.Event:2"`. The messages are encoded by hand: a field is a varint key
(number << 3 | wire type) followed by a varint, a fixed 32/64-bit value or a length-delimited
payload. Only the fields written here are encoded:

    Event          1 wall_time double, 2 step int64, 3 file_version string, 5 summary,
                   7 session_log
    Summary        1 value (repeated Summary.Value)
    Summary.Value  1 tag string, 2 simple_value float, 4 image
    Summary.Image  1 height int32, 2 width int32, 3 colorspace int32, 4 encoded_image_string
    SessionLog     1 status (START = 1)
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from typing import Any

from absl import logging

from jaxtricks.metrics import is_writer

FILE_VERSION = "brain.Event:2"
_CASTAGNOLI = 0x82F63B78  # crc32c polynomial, bit-reversed
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> Summary.Image colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
_COLORSPACE = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _crc_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CASTAGNOLI if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), one table lookup per byte."""
  crc = 0xFFFFFFFF
  table = _TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _varint(value: int) -> bytes:
  value &= 0xFFFFFFFFFFFFFFFF  # negative int64: ten bytes of two's complement
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _int_field(number: int, value: int) -> bytes:
  return _key(number, 0) + _varint(value)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _key(number, 2) + _varint(len(payload)) + payload


def _event(step: int, *, wall_time: float | None = None, file_version: str | None = None,
           summary: bytes | None = None, session_log: bytes | None = None) -> bytes:
  out = _key(1, 1) + struct.pack("<d", time.time() if wall_time is None else wall_time)
  out += _int_field(2, step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  if session_log is not None:
    out += _bytes_field(7, session_log)
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value)


def _image_value(tag: str, png: bytes) -> bytes:
  width, height, colorspace = png_size(png)
  image = (_int_field(1, height) + _int_field(2, width) + _int_field(3, colorspace)
           + _bytes_field(4, png))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


def png_size(png: bytes) -> tuple[int, int, int]:
  """(width, height, TensorBoard colorspace) from a PNG's IHDR chunk."""
  if png[:8] != _PNG_SIGNATURE or png[12:16] != b"IHDR":
    raise ValueError("not a PNG image (no PNG signature and IHDR chunk)")
  width, height, _, color_type = struct.unpack(">IIBB", png[16:26])
  return width, height, _COLORSPACE.get(color_type, 3)


def _number(value: Any) -> float | None:
  """`value` as a finite float, or None for non-numeric and non-finite values."""
  if hasattr(value, "item") and getattr(value, "size", 1) == 1:
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  value = float(value)
  return value if math.isfinite(value) else None


class EventWriter:
  """Writes `events.out.tfevents.<unix time>.<hostname>` in `logdir`; only process 0 writes.

  Events are buffered and appended to the file by `flush()` (and `close()`), so no file stays
  open between flushes. `restart_step`, if given, writes a SessionLog START event at that step:
  TensorBoard then drops the events of earlier files in `logdir` at steps >= restart_step (the
  steps a resumed run logs again)."""

  def __init__(self, logdir: str, restart_step: int | None = None):
    self.path = None
    self._pending: list[bytes] = []
    if not is_writer():
      return
    os.makedirs(logdir, exist_ok=True)
    base = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                                f"{socket.gethostname()}")
    path, n = base, 0
    while os.path.exists(path):  # a second writer in the same second
      n += 1
      path = f"{base}.{n}"
    self.path = path
    self._pending.append(tfrecord(_event(0, file_version=FILE_VERSION)))
    if restart_step is not None:
      self._pending.append(tfrecord(_event(restart_step, session_log=_int_field(1, 1))))
    self.flush()

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    """One event at `step` with a scalar per finite numeric value (others are skipped)."""
    numbers = {tag: _number(v) for tag, v in values.items()}
    summary = b"".join(_bytes_field(1, _scalar_value(tag, v))
                       for tag, v in numbers.items() if v is not None)
    if self.path and summary:
      self._pending.append(tfrecord(_event(int(step), summary=summary)))

  def image(self, tag: str, step: int, png: bytes) -> None:
    """One event at `step` with the encoded PNG `png` (width and height from its header)."""
    if self.path:
      summary = _bytes_field(1, _image_value(tag, png))
      self._pending.append(tfrecord(_event(int(step), summary=summary)))

  def flush(self) -> None:
    if self.path and self._pending:
      with open(self.path, "ab") as f:
        f.write(b"".join(self._pending))
      self._pending = []

  def close(self) -> None:
    self.flush()

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def write_pngs(workdir: str, step: int) -> list[str]:
  """Writes every `*.png` under `workdir` as an image summary (tag: the file name without .png)
  at `step`, into one new event file per folder holding PNGs; returns the event files."""
  written = []
  for folder, dirs, files in os.walk(workdir):
    dirs.sort()
    pngs = sorted(name for name in files if name.endswith(".png"))
    if not pngs or not is_writer():
      continue
    with EventWriter(folder) as writer:
      for name in pngs:
        with open(os.path.join(folder, name), "rb") as f:
          png = f.read()
        try:
          writer.image(name[:-len(".png")], step, png)
        except ValueError:
          logging.warning("not written to TensorBoard: %s is not a PNG image",
                          os.path.join(folder, name))
    written.append(writer.path)
  return written

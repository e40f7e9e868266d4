"""Byte-level text corpora: the running interpreter's standard library source, or a user glob.

Files are read in sorted order and split into train / held-out by a stable hash of each file's
path relative to the corpus root, so the split never depends on the machine, the file order or the
seed. `include` / `exclude` keep only the files whose name (basename) matches one of the include
patterns (all files when empty) and none of the exclude patterns (comma-separated fnmatch
patterns), for domain adaptation on part of a corpus: e.g. pretraining on the standard library
without its tests is exclude='test_*.py', fine-tuning on its tests include='test_*.py'. The
filter does not move the corpus root, so a file kept by it falls in the same split as without it.
Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import os
import sysconfig

import numpy as np
from absl import logging

from jaxtricks.errors import ConfigError, DataError

STDLIB = "stdlib"
TASKS = ("induction", "polynomial", "uuid")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: str = STDLIB        # 'stdlib' or a glob of text files ('**' recurses)
  val_fraction: float = 0.05  # fraction of files held out (by path hash)
  max_bytes: int = 0          # 0: the whole corpus; else keep the first max_bytes of each split
  include: str = ""           # comma-separated fnmatch patterns on file names ('': every file)
  exclude: str = ""           # comma-separated fnmatch patterns on file names to leave out
  task: str = ""              # a synthetic task instead of the corpus: induction|polynomial|uuid
  task_ops: int = 5           # polynomial: operations per training expression are 1..task_ops
  task_eval_ops: int = 0      # polynomial: held-out expressions use this many (0: as training)
  task_pairs: int = 512       # uuid: the key -> value pairs to memorise

  def validate(self) -> None:
    if self.task and self.task not in TASKS:
      raise ConfigError(f"data.task={self.task!r} is unknown; valid: {', '.join(TASKS)} "
                        "(or empty for the corpus)")
    if self.task_ops < 1 or self.task_eval_ops < 0:
      raise ConfigError(f"data.task_ops must be >= 1 and data.task_eval_ops >= 0, got "
                        f"{self.task_ops} and {self.task_eval_ops}")
    if not 0.0 < self.val_fraction < 1.0:
      raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
    if self.max_bytes < 0:
      raise ConfigError(f"data.max_bytes must be >= 0, got {self.max_bytes}")
    if self.task_pairs < 1:
      raise ConfigError(f"data.task_pairs must be >= 1, got {self.task_pairs}")
    for name in ("include", "exclude"):
      if "/" in getattr(self, name) or os.sep in getattr(self, name):
        raise ConfigError(f"data.{name}={getattr(self, name)!r}: patterns match file names, "
                          "not paths (no '/')")


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray  # uint8 bytes
  val: np.ndarray
  n_train_files: int
  n_val_files: int
  source: str


def stdlib_files() -> tuple[str, list[str]]:
  """The root of the running interpreter's standard library and its .py files, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
           if "site-packages" not in f and "dist-packages" not in f]
  return root, sorted(files, key=lambda f: os.path.relpath(f, root))


def glob_files(pattern: str) -> tuple[str, list[str]]:
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(f))
  root = os.path.commonpath(files) if files else ""
  if len(files) == 1:
    root = os.path.dirname(root)
  return root, files


def patterns(text: str) -> list[str]:
  """The non-empty comma-separated fnmatch patterns of `text`."""
  return [p.strip() for p in text.split(",") if p.strip()]


def keep_file(path: str, include: str, exclude: str) -> bool:
  """Whether the basename of `path` matches an include pattern (any, if none) and no exclude one
  (case-sensitive on every platform)."""
  name = os.path.basename(path)
  matches = lambda text: any(fnmatch.fnmatchcase(name, p) for p in patterns(text))
  return (not patterns(include) or matches(include)) and not matches(exclude)


def is_held_out(relpath: str, val_fraction: float) -> bool:
  """Stable across machines and runs: the first 8 bytes of md5(path) as a fraction of 2**64."""
  digest = hashlib.md5(relpath.replace(os.sep, "/").encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def load_corpus(cfg: DataConfig, min_len: int = 2) -> Corpus:
  """Reads and splits the corpus; raises DataError if it is empty, unreadable or too short."""
  if cfg.corpus == STDLIB:
    root, files = stdlib_files()
  else:
    root, files = glob_files(cfg.corpus)
  if not files:
    raise DataError(f"corpus {cfg.corpus!r} matched no files")
  if cfg.include or cfg.exclude:
    kept = [f for f in files if keep_file(f, cfg.include, cfg.exclude)]
    if not kept:
      raise DataError(f"corpus {cfg.corpus!r}: include={cfg.include!r} exclude={cfg.exclude!r} "
                      f"leave none of its {len(files)} files")
    files = kept
  parts: dict[bool, list[bytes]] = {False: [], True: []}
  unreadable = []
  for path in files:
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      unreadable.append(f"{path}: {e.strerror}")
      continue
    if data:
      parts[is_held_out(os.path.relpath(path, root), cfg.val_fraction)].append(data)
  if unreadable:
    logging.warning("skipped %d unreadable files, first: %s", len(unreadable), unreadable[0])
  n_val_files, n_train_files = len(parts[True]), len(parts[False])
  train, val = b"".join(parts[False]), b"".join(parts[True])
  if not train and not val:
    reason = f"all {len(files)} files are unreadable" if unreadable else "all files are empty"
    raise DataError(f"corpus {cfg.corpus!r} holds no text: {reason}")
  if not val or not train:
    # Too few files for a split by path: hold out the tail of the bytes instead.
    data = train or val
    cut = int(len(data) * (1 - cfg.val_fraction))
    train, val = data[:cut], data[cut:]
    logging.info("corpus %r: too few files for a split by path; held out its last %d bytes",
                 cfg.corpus, len(val))
  if cfg.max_bytes:
    train, val = train[:cfg.max_bytes], val[:cfg.max_bytes]
  for name, split in (("train", train), ("held-out", val)):
    if len(split) < min_len:
      raise DataError(f"corpus {cfg.corpus!r}: the {name} split has {len(split)} bytes, "
                      f"fewer than one sequence ({min_len})")
  return Corpus(np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8),
                n_train_files, n_val_files, cfg.corpus)

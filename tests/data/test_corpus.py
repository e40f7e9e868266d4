"""Byte corpora: the stdlib corpus, user globs, the stable split by path hash, clear errors."""

import os

import numpy as np
import pytest

from jaxtricks.data.corpus import DataConfig, is_held_out, load_corpus, stdlib_files
from jaxtricks.errors import ConfigError, DataError
from tests.support import write_text_corpus


@pytest.fixture(scope="module")
def stdlib_corpus():
  return load_corpus(DataConfig())


def test_stdlib_corpus_loads_and_splits_by_file(stdlib_corpus):
  c = stdlib_corpus
  assert c.source == "stdlib"
  assert c.train.dtype == np.uint8 and c.val.dtype == np.uint8
  assert c.n_train_files > 10 * c.n_val_files > 0
  root, files = stdlib_files()
  assert all("site-packages" not in f for f in files)
  held = [is_held_out(os.path.relpath(f, root), 0.05) for f in files]
  sizes = [os.path.getsize(f) for f in files]
  assert c.n_val_files == sum(1 for h, s in zip(held, sizes, strict=True) if h and s)
  assert len(c.val) == sum(s for h, s in zip(held, sizes, strict=True) if h)
  assert len(c.train) == sum(s for h, s in zip(held, sizes, strict=True) if not h)
  assert b"def " in c.train[:100_000].tobytes()


def test_held_out_split_is_stable():
  # Pinned: the split of a path must never change between machines, runs or versions.
  paths = [f"pkg{i}/module{i}.py" for i in range(12)]
  assert [is_held_out(p, 0.5) for p in paths] == [
      True, True, True, True, False, True, False, True, True, False, False, True]


def test_held_out_fraction_and_monotonicity():
  paths = [f"dir{i % 17}/file{i}.txt" for i in range(20_000)]
  for fraction in (0.05, 0.3):
    share = np.mean([is_held_out(p, fraction) for p in paths])
    assert abs(share - fraction) < 0.01
  # A file held out at a small fraction stays held out at a larger one.
  assert all(is_held_out(p, 0.3) for p in paths[:2000] if is_held_out(p, 0.05))


def test_user_glob_reads_every_file_into_its_split(tmp_path):
  pattern = write_text_corpus(tmp_path, n_files=40, n_bytes=200)
  (tmp_path / "part0" / "notes.md").write_text("not matched")
  c = load_corpus(DataConfig(corpus=pattern, val_fraction=0.25))
  files = sorted(str(p) for p in tmp_path.rglob("*.txt"))
  held = {f: is_held_out(os.path.relpath(f, tmp_path), 0.25) for f in files}
  expected_val = b"".join(open(f, "rb").read() for f in files if held[f])
  expected_train = b"".join(open(f, "rb").read() for f in files if not held[f])
  assert 0 < c.n_val_files < c.n_train_files and c.n_val_files + c.n_train_files == 40
  assert c.val.tobytes() == expected_val
  assert c.train.tobytes() == expected_train


def test_max_bytes_truncates_each_split(tmp_path):
  pattern = write_text_corpus(tmp_path, n_files=40, n_bytes=200)
  full = load_corpus(DataConfig(corpus=pattern, val_fraction=0.25))
  short = load_corpus(DataConfig(corpus=pattern, val_fraction=0.25, max_bytes=300))
  assert short.train.tobytes() == full.train[:300].tobytes()
  assert short.val.tobytes() == full.val[:300].tobytes()


def test_too_few_files_fall_back_to_a_byte_tail_split(tmp_path):
  data = bytes(range(32, 127)) * 20  # 1900 bytes
  (tmp_path / "only.txt").write_bytes(data)
  c = load_corpus(DataConfig(corpus=str(tmp_path / "*.txt"), val_fraction=0.1))
  cut = int(len(data) * 0.9)
  assert c.train.tobytes() == data[:cut] and c.val.tobytes() == data[cut:]


def test_empty_glob_is_a_clear_data_error(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(DataError, match="matched no files") as err:
    load_corpus(DataConfig(corpus=pattern))
  assert pattern in str(err.value)
  (tmp_path / "adir.txt").mkdir()  # directories are not files
  with pytest.raises(DataError, match="matched no files"):
    load_corpus(DataConfig(corpus=str(tmp_path / "*.txt")))


def test_empty_files_are_a_clear_data_error(tmp_path):
  for name in ("a.txt", "b.txt"):
    (tmp_path / name).write_bytes(b"")
  with pytest.raises(DataError, match="holds no text: all files are empty"):
    load_corpus(DataConfig(corpus=str(tmp_path / "*.txt")))


def test_corpus_shorter_than_a_sequence_is_a_clear_data_error(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"x" * 100)
  with pytest.raises(DataError, match="fewer than one sequence"):
    load_corpus(DataConfig(corpus=str(tmp_path / "a.txt")), min_len=65)


@pytest.mark.parametrize("changes", [dict(val_fraction=0.0), dict(val_fraction=1.0),
                                     dict(max_bytes=-1)])
def test_invalid_data_config(changes):
  with pytest.raises(ConfigError):
    DataConfig(**changes).validate()

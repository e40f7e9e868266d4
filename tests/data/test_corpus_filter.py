"""The corpus file filter (data.include / data.exclude): fnmatch patterns on file names, applied
before the split, which stays the hash of the path relative to the unfiltered corpus root."""

import os

import pytest

from jaxtricks.data.corpus import DataConfig, is_held_out, keep_file, load_corpus
from jaxtricks.errors import ConfigError, DataError


@pytest.fixture
def corpus(tmp_path):
  """Modules and their tests in two packages; tests live only in pkg_b/tests, so the kept files'
  common path is deeper than the corpus root."""
  names = {}
  for i in range(30):
    for rel in (f"pkg_a/mod{i}.py", f"pkg_b/tests/test_mod{i}.py", f"pkg_b/util{i}.py"):
      path = tmp_path / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(f"# {rel}\n" + "x = 1\n" * (i + 1))
      names[str(path)] = rel
  (tmp_path / "pkg_a" / "notes.txt").write_text("not python")
  return str(tmp_path / "**" / "*.py"), names


def expected(names, keep, fraction=0.25):
  """Train and held-out bytes of the kept files, split by their path under the full root."""
  parts = {False: b"", True: b""}
  for path in sorted(names):
    if keep(os.path.basename(path)):
      parts[is_held_out(names[path], fraction)] += open(path, "rb").read()
  return parts[False], parts[True]


@pytest.mark.parametrize("include, exclude, keep", [
  ("", "", lambda n: True),
  ("test_*.py", "", lambda n: n.startswith("test_")),
  ("", "test_*.py", lambda n: not n.startswith("test_")),
  ("mod*.py, util1?.py", "mod2*", lambda n: (n.startswith("mod") and not n.startswith("mod2"))
   or n in {f"util{i}.py" for i in range(10, 20)}),
])
def test_filter_keeps_matching_names_and_the_split_of_each_file(corpus, include, exclude, keep):
  pattern, names = corpus
  c = load_corpus(DataConfig(corpus=pattern, val_fraction=0.25, include=include, exclude=exclude))
  train, val = expected(names, keep)
  assert c.train.tobytes() == train and c.val.tobytes() == val
  assert c.n_train_files + c.n_val_files == sum(keep(os.path.basename(p)) for p in names)


def test_pretraining_and_fine_tuning_sets_partition_the_corpus(corpus):
  pattern, names = corpus
  full = load_corpus(DataConfig(corpus=pattern, val_fraction=0.25))
  pre = load_corpus(DataConfig(corpus=pattern, val_fraction=0.25, exclude="test_*.py"))
  tune = load_corpus(DataConfig(corpus=pattern, val_fraction=0.25, include="test_*.py"))
  assert pre.n_train_files + tune.n_train_files == full.n_train_files
  assert pre.n_val_files + tune.n_val_files == full.n_val_files
  assert len(pre.train) + len(tune.train) == len(full.train)
  assert b"test_mod" not in pre.train.tobytes() and b"pkg_a" not in tune.train.tobytes()


def test_keep_file_matches_basenames_case_sensitively():
  assert keep_file(os.path.join("a", "test_x", "mod.py"), "", "test_*")  # directories ignored
  assert not keep_file(os.path.join("a", "Test_x.py"), "test_*.py", "")
  assert keep_file("test_x.py", " test_*.py ,", "")                       # spaces, empty items
  assert not keep_file("test_x.py", "*.py", "x.py,test_*")


def test_a_filter_that_leaves_nothing_is_a_clear_data_error(corpus):
  pattern, _ = corpus
  with pytest.raises(DataError, match=r"include='\*.rs' exclude='' leave none of its 90 files") \
      as err:
    load_corpus(DataConfig(corpus=pattern, include="*.rs"))
  assert pattern in str(err.value)
  with pytest.raises(DataError, match="leave none"):
    load_corpus(DataConfig(corpus=pattern, include="test_*.py", exclude="*.py"))


def test_path_patterns_are_a_config_error():
  DataConfig(include="test_*.py", exclude="*_old.py").validate()
  with pytest.raises(ConfigError, match="data.include='tests/test_.*': .*not paths"):
    DataConfig(include="tests/test_*.py").validate()
  with pytest.raises(ConfigError, match="data.exclude"):
    DataConfig(exclude="a/*").validate()

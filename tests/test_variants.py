"""experiments.variants: rows written as each variant finishes, reruns skip finished variants,
one line for a failed variant, rows of another config refused."""

import json
import logging

import pytest

from experiments.variants import ROW_FILE, RowKey, VariantFailed, run_variants, variant_key
from jaxtricks.errors import ConfigError, DataError
from jaxtricks.train.loop import Preempted


class Recorder:
  """run_one that records its calls and fails on the names in `fail`."""

  def __init__(self, fail=(), error=RuntimeError):
    self.calls, self.fail, self.error = [], set(fail), error

  def __call__(self, name, directory):
    self.calls.append(name)
    if name in self.fail:
      raise self.error(f"broken {name}")
    return {"name": name, "value": len(name), "wall_s": 1.0}


def key_of(name, **more):
  values = {"train.steps": 3, "model.size": len(name), **more}
  defaults = {"train.steps": 10, "model.size": 1, "model.new": 0}
  return RowKey(values, {k: defaults[k] for k in values})


def test_rows_are_written_in_order_and_a_rerun_reads_them(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  first = Recorder()
  rows = run_variants(str(tmp_path), ["a", "bb", "ccc"], key_of, first)
  assert first.calls == ["a", "bb", "ccc"]
  assert [r["name"] for r in rows] == ["a", "bb", "ccc"]
  saved = json.loads((tmp_path / "variants" / "bb" / ROW_FILE).read_text())
  assert saved == {"config": key_of("bb").values, "row": rows[1]}
  second = Recorder()
  assert run_variants(str(tmp_path), ["a", "bb", "ccc"], key_of, second) == rows
  assert second.calls == []
  assert "variant bb: finished earlier" in caplog.text


def test_failure_keeps_earlier_rows_and_the_rerun_trains_only_the_rest(tmp_path):
  broken = Recorder(fail={"bb"})
  with pytest.raises(VariantFailed) as e:
    run_variants(str(tmp_path), ["a", "bb", "ccc"], key_of, broken)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("variant 'bb' failed: RuntimeError: broken bb (traceback in ")
  assert "the rows of a are kept" in message
  assert broken.calls == ["a", "bb"]
  assert (tmp_path / "variants" / "a" / ROW_FILE).exists()
  assert not (tmp_path / "variants" / "bb" / ROW_FILE).exists()
  assert "Traceback" in (tmp_path / "variants" / "bb" / "error.txt").read_text()
  fixed = Recorder()
  rows = run_variants(str(tmp_path), ["a", "bb", "ccc"], key_of, fixed)
  assert fixed.calls == ["bb", "ccc"] and [r["name"] for r in rows] == ["a", "bb", "ccc"]
  assert not (tmp_path / "variants" / "bb" / "error.txt").exists()


def test_a_user_error_keeps_its_message(tmp_path):
  with pytest.raises(VariantFailed, match=r"^variant 'a' failed: broken a; no variant had "):
    run_variants(str(tmp_path), ["a"], key_of, Recorder(fail={"a"}, error=DataError))
  assert not (tmp_path / "variants" / "a" / "error.txt").exists()


def test_preemption_passes_through(tmp_path):
  def preempted(name, directory):
    raise Preempted(4, directory)

  with pytest.raises(Preempted):
    run_variants(str(tmp_path), ["a"], key_of, preempted)


def test_a_row_of_another_config_is_refused(tmp_path):
  run_variants(str(tmp_path), ["a"], key_of, Recorder())
  other = lambda name: RowKey({"train.steps": 5, "model.size": 1}, {})  # noqa: E731
  with pytest.raises(ConfigError, match=r"holds variant 'a' made with another config "
                                        r"\(train.steps: 3 -> 5\)"):
    run_variants(str(tmp_path), ["a"], other, Recorder())


def test_a_field_added_since_a_row_was_written_counts_as_its_default(tmp_path):
  run_variants(str(tmp_path), ["a"], key_of, Recorder())
  later = Recorder()  # the code gained the field model.new (default 0)
  run_variants(str(tmp_path), ["a"], lambda name: key_of(name, **{"model.new": 0}), later)
  assert later.calls == []
  with pytest.raises(ConfigError, match=r"\(model.new: 0 -> 2\)"):
    run_variants(str(tmp_path), ["a"], lambda name: key_of(name, **{"model.new": 2}), Recorder())


def test_variant_key_defaults_keep_the_component_kinds():
  from experiments import get_config  # noqa: PLC0415
  from jaxtricks.config import override  # noqa: PLC0415
  config = override(get_config("lckv", "smoke"), {"model.attention": "lckv", "window": 4})
  key = variant_key(config, ignore=("variants",))
  assert key.values["model.attention"] == key.defaults["model.attention"] == "lckv"
  assert key.values["window"] == 4 and key.defaults["window"] == 32
  assert key.defaults["model.attention.iterations"] == 7 and "variants" not in key.values


def test_an_unreadable_row_is_set_aside_and_trained_again(tmp_path):
  run_variants(str(tmp_path), ["a"], key_of, Recorder())
  path = tmp_path / "variants" / "a" / ROW_FILE
  path.write_text('{"config": ')
  again = Recorder()
  run_variants(str(tmp_path), ["a"], key_of, again)
  assert again.calls == ["a"]
  assert (path.parent / (ROW_FILE + ".unreadable")).exists()
  assert json.loads(path.read_text())["row"]["name"] == "a"


def test_rows_go_under_the_given_subdir(tmp_path):
  run_variants(str(tmp_path), ["n1"], key_of, Recorder(), subdir="runs")
  assert (tmp_path / "runs" / "n1" / ROW_FILE).exists()

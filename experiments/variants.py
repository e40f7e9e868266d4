"""Multi-variant experiments: one row per variant, written to the workdir as soon as the variant
finishes, so that a rerun of the same command trains only the variants still missing (as a
single run resumes from its checkpoint) and an error in one variant keeps the others' results.

A variant `NAME` keeps its training run and its row in `WORKDIR/<subdir>/NAME/`; `row.json` holds
the row together with the variant's resolved config, and a row made under another config is
refused rather than mixed into a new summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from jaxtricks import metrics as mlog
from jaxtricks.config import changed_keys, default_twin, flatten
from jaxtricks.errors import ConfigError, UserError
from jaxtricks.train.loop import Preempted

ROW_FILE = "row.json"


class VariantFailed(UserError):
  """One variant of a multi-variant experiment failed; the rows finished before it are kept."""


@dataclasses.dataclass(frozen=True)
class RowKey:
  """The config a row depends on (`values`, as JSON would give it back) and the same fields at
  their defaults: a field added to the code since a row was written counts as its default."""
  values: dict[str, Any]
  defaults: dict[str, Any]


def _flat_json(config: Any, ignore: Sequence[str]) -> dict[str, Any]:
  flat = {k: v for k, v in flatten(config).items()
          if not k.startswith("mesh.") and k not in ignore}
  return json.loads(json.dumps(flat, default=str))


def variant_key(config: Any, ignore: Sequence[str] = ()) -> RowKey:
  """The key of a row: every field except the mesh (a row does not depend on the device layout)
  and `ignore` (the variant selection)."""
  return RowKey(_flat_json(config, ignore), _flat_json(default_twin(config), ignore))


def _read_row(path: str, name: str, key: RowKey) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    saved_key, row = saved["config"], saved["row"]
  except (OSError, ValueError, KeyError, TypeError):
    os.replace(path, path + ".unreadable")
    mlog.log_progress(f"variant {name}: {path} was unreadable (renamed *.unreadable); "
                      "training it again")
    return None
  saved_key = {**{k: v for k, v in key.defaults.items() if k not in saved_key}, **saved_key}
  diff = changed_keys(saved_key, key.values)
  if diff:
    changes = ", ".join(f"{k}: {saved_key.get(k)!r} -> {key.values.get(k)!r}"
                        for k in diff[:6])
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    raise ConfigError(f"{path} holds variant {name!r} made with another config ({changes}"
                      f"{more}); use another --workdir or delete that variant's folder")
  return row


def _write_row(path: str, key: RowKey, row: dict) -> None:
  """Written to a temporary file and renamed: a row file is complete or absent."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"config": key.values, "row": row}, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def run_variants(workdir: str, names: Sequence[str], key_of: Callable[[str], RowKey],
                 run_one: Callable[[str, str], dict], subdir: str = "variants") -> list[dict]:
  """Rows of `names` in order: read from `row.json` where a variant finished earlier under the
  same config (`key_of(name)`), else `run_one(name, variant_dir)` and written at once.

  A row gets the variant's `wall_s` unless it has one. Any error in a variant becomes one
  `VariantFailed` line naming it and the rows kept; an unexpected error's traceback goes to
  `variant_dir/error.txt`. Preemption passes through."""
  rows, done = [], []
  for name in names:
    directory = os.path.join(workdir, subdir, name)
    path = os.path.join(directory, ROW_FILE)
    key = key_of(name)
    row = _read_row(path, name, key)
    if row is not None:
      mlog.log_progress(f"variant {name}: finished earlier, row read from {path}")
    else:
      os.makedirs(directory, exist_ok=True)
      t0 = time.time()
      try:
        row = dict(run_one(name, directory))
      except (Preempted, KeyboardInterrupt):
        raise
      except Exception as e:
        kept = (f"the rows of {', '.join(done)} are kept under {os.path.join(workdir, subdir)}"
                if done else "no variant had finished")
        if isinstance(e, UserError):
          what = str(e)
        else:
          log = os.path.join(directory, "error.txt")
          with open(log, "w") as f:
            f.write(traceback.format_exc())
          what = f"{type(e).__name__}: {e} (traceback in {log})"
        what = " ".join(what.split())  # one line
        raise VariantFailed(f"variant {name!r} failed: {what}; {kept}; rerun the same command "
                            "to train only the variants still missing") from e
      row.setdefault("wall_s", time.time() - t0)
      _write_row(path, key, row)
      stale = os.path.join(directory, "error.txt")
      if os.path.exists(stale):
        os.remove(stale)
    rows.append(row)
    done.append(name)
  return rows

"""jaxtricks entry point.

    python launch.py --exp=NAME [--workdir=DIR] [--preset=smoke|default|full] [--steps=N]
                     [--seed=S] [--ckpt_every=N] [--log_every=N] [--init_from=WORKDIR]
                     [--model.d_model=256 ...]

Every field of the experiment's config is a flag (`--help` lists them with their defaults).
Running the same command again resumes from the latest checkpoint in the workdir. SIGTERM saves a
checkpoint at the next step boundary and exits 0. `--init_from` starts from the parameters of
another run's newest checkpoint (fine-tuning; that workdir is only read). Several processes (one
per host): pass --coordinator_address, --num_processes and --process_id, or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (BUILD.md).
"""

from __future__ import annotations

import errno
import json
import sys

from absl import app, flags, logging

EXP_DEFAULT = "lm"
PRESET_DEFAULT = "default"
SHORTCUTS = {"steps": "train.steps", "seed": "train.seed", "ckpt_every": "train.ckpt_every",
             "log_every": "train.log_every", "init_from": "train.init_from"}

flags.DEFINE_string("exp", EXP_DEFAULT, "experiment name (experiments/NAME.py)")
flags.DEFINE_string("preset", PRESET_DEFAULT, "smoke (<1 min CPU), default (<5 min CPU), full")
flags.DEFINE_string("workdir", None, "output directory (default runs/<exp>)")
for _name, _key in SHORTCUTS.items():
  flags.DEFINE_string(_name, None, f"shortcut for --{_key}")
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
FLAGS = flags.FLAGS
# OSErrors that mean the disk, not jaxtricks: full, over quota, read-only, not permitted.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _prescan(argv: list[str], name: str, default: str) -> str:
  """Reads --name=value (or --name value) before absl parses, to know which flags to define."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _define_config_flags(config) -> list[str]:
  from jaxtricks.config import flag_defaults  # noqa: PLC0415

  keys = []
  for key, (value, note) in flag_defaults(config).items():
    flags.DEFINE_string(key, None, f"default: {value!r}{note}")
    keys.append(key)
  return keys


def _parse(argv: list[str]) -> list[str]:
  try:
    from experiments import get_config  # noqa: PLC0415
    from jaxtricks.errors import UserError  # noqa: PLC0415
  except OSError as e:  # chex imports absl.testing, which needs a writable temporary directory
    _fail(f"cannot start: {e.strerror or e} (is the disk full?)")

  exp = _prescan(argv, "exp", EXP_DEFAULT)
  preset = _prescan(argv, "preset", PRESET_DEFAULT)
  try:
    config = get_config(exp, preset)
  except UserError as e:
    _fail(str(e))
  keys = _define_config_flags(config)
  try:
    return FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    import difflib  # noqa: PLC0415

    close = difflib.get_close_matches(e.flagname, keys + list(SHORTCUTS), n=3)
    hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
    _fail(f"unknown flag --{e.flagname}{hint}; valid config keys: {', '.join(keys)}; "
          "see --help")
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


class _QuietLibraries:
  """Keeps INFO lines of jaxtricks itself; other libraries' INFO chatter (orbax, jax) is dropped."""

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    return record.levelno >= 30 or "/jaxtricks/" in path or "/experiments/" in path or (
        path.endswith("launch.py"))


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
  from experiments import get_config, load  # noqa: PLC0415
  from jaxtricks import sharding, tensorboard  # noqa: PLC0415
  from jaxtricks.config import flag_defaults, override  # noqa: PLC0415
  from jaxtricks.errors import UserError  # noqa: PLC0415
  from jaxtricks.train.loop import Preempted  # noqa: PLC0415
  from jaxtricks.workdir_lock import WorkdirLock  # noqa: PLC0415

  try:
    sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id)
    config = get_config(FLAGS.exp, FLAGS.preset)
    updates = {key: FLAGS[key].value for key in flag_defaults(config)
               if FLAGS[key].value is not None}
    updates.update({key: FLAGS[name].value for name, key in SHORTCUTS.items()
                    if FLAGS[name].value is not None})
    config = override(config, updates).validate()
    workdir = FLAGS.workdir or f"runs/{FLAGS.exp}"
    with WorkdirLock(workdir):  # one run per workdir: a second one is refused here
      summary = load(FLAGS.exp).run(config, workdir)
      if getattr(config.train, "tensorboard", False):  # the figures, beside the scalars
        tensorboard.write_pngs(workdir, step=config.train.steps)
  except UserError as e:
    _fail(str(e))
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  except KeyboardInterrupt:
    _fail("interrupted")
  except OSError as e:
    if e.errno not in DISK_ERRNOS:
      raise
    _fail(f"cannot write {e.filename or 'the workdir'}: {e.strerror}; nothing after the last "
          "checkpoint was saved")
  brief = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
  logging.info("summary: %s", json.dumps(brief, default=str))
  print(json.dumps(brief, indent=2, default=str))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)

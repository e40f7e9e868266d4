"""One run per workdir: a lock file that refuses a second run started on the same workdir.

`WorkdirLock(workdir)` puts `WORKDIR/.jaxtricks.lock` in place atomically (a complete temporary
file hard-linked to that name, which fails if it exists) holding JSON: pid, host, boot id, pid
namespace, the process start time from /proc/PID/stat (to tell a reused pid), the command line
and the start time. A heartbeat thread refreshes the file's mtime every HEARTBEAT_S seconds.

An existing lock is live when
- it was written on this host (same name, same boot, same pid namespace): its pid exists (EPERM
  counts as alive), is not a zombie and started at the recorded time;
- otherwise (another host or container): its heartbeat is younger than STALE_S, the only thing that
  can be checked from here. A lock written on this host name before a reboot is stale.
A live lock is refused with a one-line WorkdirBusy before anything in the workdir is written. A
stale, unreadable or garbled one is taken over with a warning. Takers of one stale lock race for a
claim on it (a file made with O_EXCL, named after the lock's inode and bytes); the winner checks
that the lock is still the one it judged stale and swaps in its own with os.replace, so exactly one
taker wins and the others then find a live lock.

Several processes (jax.process_count() > 1): process 0 alone takes, refreshes and releases the
lock, and publishes the outcome in JAX's coordination key-value store (no compilation); the others
wait for it, so a refusal ends every process with the same error rather than leaving them waiting
at their first collective. Every process judging the file itself would not do: a pid can only be
checked on its own host, so processes on different hosts could judge one lock differently.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from absl import logging

from jaxtricks.errors import UserError

LOCK_NAME = ".jaxtricks.lock"
HEARTBEAT_S = 5.0
STALE_S = 60.0            # a lock from another host without a heartbeat for this long is stale
GARBLED_GRACE_S = 1.0     # without hard links a new lock is briefly empty: wait this long
CLAIM_STALE_S = 10.0      # a takeover takes milliseconds: a claim this old was left by a crash
ACQUIRE_TIMEOUT_S = 30.0
PEER_TIMEOUT_S = 600.0    # processes other than 0 wait this long for its outcome
NO_LINK_ERRNOS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV)
_kv_keys = itertools.count()  # one key-value entry per multi-process lock taken


class WorkdirLockError(UserError):
  """The workdir's lock cannot be written (read-only or full workdir)."""


class WorkdirBusy(WorkdirLockError):
  """Another run, still alive, holds the workdir's lock."""


def _read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks after boot) of `pid` from /proc/PID/stat, or None."""
  text = _read_text(f"/proc/{pid}/stat")
  fields = text.rsplit(")", 1)[-1].split() if text else []  # the name may hold spaces and ')'
  try:
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
  except (IndexError, ValueError):
    return None


def own_record() -> dict[str, Any]:
  """What the lock file of this process holds."""
  stat = _proc_stat(os.getpid())
  try:
    pid_ns = os.readlink("/proc/self/ns/pid")
  except OSError:
    pid_ns = None
  boot_id = _read_text("/proc/sys/kernel/random/boot_id")
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "boot_id": boot_id.strip() if boot_id else None, "pid_ns": pid_ns,
          "proc_start": stat[1] if stat else None, "command": sys.argv,
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _parse(data: bytes) -> dict[str, Any] | None:
  try:
    owner = json.loads(data)
  except ValueError:
    return None
  valid = (isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner["pid"] > 0
           and isinstance(owner.get("host"), str))
  return owner if valid else None


def _checkable_here(owner: dict[str, Any], me: dict[str, Any]) -> bool:
  return owner["host"] == me["host"] and owner.get("pid_ns") == me["pid_ns"]


def _stale_reason(owner: dict[str, Any] | None, st: os.stat_result, me: dict[str, Any]
                  ) -> str | None:
  """None when the lock of `owner` (its file's stat `st`) is live, else why it is stale."""
  if owner is None:
    return "its lock file is unreadable"
  boot_id = owner.get("boot_id")
  if owner["host"] == me["host"] and boot_id and me["boot_id"] and boot_id != me["boot_id"]:
    return "this host has rebooted since"
  if _checkable_here(owner, me):
    pid = owner["pid"]
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return f"pid {pid} is gone"
    except PermissionError:
      pass  # alive, another user's
    except (OverflowError, OSError):
      return f"pid {pid} is not a process"
    stat = _proc_stat(pid)
    if stat is None:  # gone meanwhile, or no /proc here (then the pid's existence is all we know)
      return f"pid {pid} is gone" if os.path.exists("/proc/self/stat") else None
    if stat[0] == "Z":
      return f"pid {pid} has exited"
    if owner.get("proc_start") is not None and stat[1] != owner["proc_start"]:
      return f"pid {pid} now belongs to another process"
    return None
  age = time.time() - st.st_mtime
  return f"no heartbeat for {age:.0f} s" if age > STALE_S else None


def _read_lock(path: str) -> tuple[bytes, os.stat_result] | None:
  """The lock file's bytes and stat (b'' if unreadable), or None if there is none."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  try:
    with open(path, "rb") as f:
      return f.read(), os.fstat(f.fileno())
  except FileNotFoundError:
    return None
  except OSError:
    return b"", st


def _write_all(fd: int, data: bytes) -> None:
  while data:
    data = data[os.write(fd, data):]


def _describe(owner: dict[str, Any] | None) -> str:
  if owner is None:
    return "an unknown run"
  return f"pid {owner['pid']} on host {owner['host']}, started {owner.get('started', '?')}"


class WorkdirLock:
  """Context manager: holds the lock on `workdir` for one run (process 0 of several)."""

  def __init__(self, workdir: str, process_index: int | None = None,
               process_count: int | None = None):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._process = (process_index, process_count)
    self._fd: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._previous_sigterm = None

  def __enter__(self) -> WorkdirLock:
    index, count = self._process
    if index is None or count is None:
      import jax  # noqa: PLC0415  (lazily: the lock itself needs no JAX)

      index, count = jax.process_index(), jax.process_count()
    if count == 1:
      self.acquire()
      self._exit_cleanly_on_sigterm()
    elif index == 0:
      key = f"jaxtricks/workdir_lock/{next(_kv_keys)}"
      try:
        self.acquire()
      except BaseException as e:
        _publish(key, str(e) if isinstance(e, UserError) else
                 f"process 0 could not take the lock on workdir {self.workdir} ({e!r})")
        raise
      try:
        _publish(key, "")
      except BaseException:
        self.release()
        raise
    else:
      message = _wait_for_process_0(f"jaxtricks/workdir_lock/{next(_kv_keys)}")
      if message:
        raise WorkdirBusy(message)
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock: WorkdirBusy if a live run holds it, WorkdirLockError if unwritable."""
    me = own_record()
    data = (json.dumps(me) + "\n").encode()
    deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
    try:
      os.makedirs(self.workdir, exist_ok=True)
      while time.monotonic() < deadline:
        found = _read_lock(self.path)
        if found is None:
          if self._create(data):
            break
          continue
        owner = _parse(found[0])
        reason = _stale_reason(owner, found[1], me)
        if reason is None:
          raise WorkdirBusy(self._busy_message(owner, found[1], me))
        if owner is None and abs(time.time() - found[1].st_mtime) < GARBLED_GRACE_S:
          time.sleep(0.05)  # perhaps still being written
        elif self._take_over(found, data, me):
          logging.warning("workdir %s: took over the lock of %s: %s", self.workdir,
                          _describe(owner), reason)
          break
      else:
        raise WorkdirBusy(f"workdir {self.workdir}: could not take its lock within "
                          f"{ACQUIRE_TIMEOUT_S:.0f} s (other runs keep taking it); try again")
    except OSError as e:
      raise WorkdirLockError(f"workdir {self.workdir} is not writable: {e.strerror or e}"
                             ) from None
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still this run's."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    if self._fd is not None:
      try:
        if os.path.samestat(os.stat(self.path), os.fstat(self._fd)):
          os.remove(self.path)
      except OSError:
        pass  # already gone, or taken over (the heartbeat warned)
      os.close(self._fd)
      self._fd = None
    if self._previous_sigterm is not None:
      signal.signal(signal.SIGTERM, self._previous_sigterm)
      self._previous_sigterm = None

  def _busy_message(self, owner: dict[str, Any], st: os.stat_result, me: dict[str, Any]) -> str:
    text = (f"workdir {self.workdir} is in use by another run ({_describe(owner)}); wait for it "
            "to finish or use another --workdir")
    if not _checkable_here(owner, me):
      text += (f" (its last heartbeat was {time.time() - st.st_mtime:.0f} s ago; it counts as "
               f"gone after {STALE_S:.0f} s)")
    return text

  def _temp(self, data: bytes) -> tuple[str, int]:
    fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + ".", suffix=".tmp", dir=self.workdir)
    try:
      _write_all(fd, data)
    except BaseException:
      os.close(fd)
      os.remove(tmp)
      raise
    return tmp, fd

  def _create(self, data: bytes) -> bool:
    """Puts a lock holding `data` where there is none; False if another one appeared first."""
    tmp, fd = self._temp(data)
    try:
      os.link(tmp, self.path)
    except FileExistsError:
      os.close(fd)
      return False
    except OSError as e:
      os.close(fd)
      if e.errno not in NO_LINK_ERRNOS:
        raise
      return self._create_exclusive(data)
    finally:
      os.remove(tmp)
    self._fd = fd
    return True

  def _create_exclusive(self, data: bytes) -> bool:
    """Without hard links: O_EXCL, then the content (readers wait GARBLED_GRACE_S for it)."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
      return False
    _write_all(fd, data)
    self._fd = fd
    return True

  def _take_over(self, found: tuple[bytes, os.stat_result], data: bytes,
                 me: dict[str, Any]) -> bool:
    """Replaces the stale lock `found` by one holding `data`; False if another taker won."""
    generation = hashlib.sha256(found[0] + str(found[1].st_ino).encode()).hexdigest()[:16]
    claim = self._claim(generation)
    if claim is None:
      return False
    try:
      now = _read_lock(self.path)
      if (now is None or now[0] != found[0] or now[1].st_ino != found[1].st_ino
          or _stale_reason(_parse(now[0]), now[1], me) is None):
        return False  # changed meanwhile: judge it afresh
      tmp, fd = self._temp(data)
      try:
        os.replace(tmp, self.path)
      except BaseException:
        os.close(fd)
        os.remove(tmp)
        raise
      self._fd = fd
      for old in glob.glob(glob.escape(f"{self.path}.takeover-{generation}") + "-*"):
        _remove_quietly(old)  # that lock is gone for good: its claims are of no further use
      return True
    finally:
      _remove_quietly(claim)

  def _claim(self, generation: str) -> str | None:
    """An exclusive claim on taking over one stale lock, or None if another taker holds it.
    Claims left by a crashed taker (older than CLAIM_STALE_S) are passed over by numbering."""
    for k in itertools.count():
      claim = f"{self.path}.takeover-{generation}-{k}"
      try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return claim
      except FileExistsError:
        try:
          if time.time() - os.stat(claim).st_mtime < CLAIM_STALE_S:
            time.sleep(0.01)
            return None
        except FileNotFoundError:
          return None  # its taker just finished
    return None  # unreachable

  def _heartbeat(self) -> None:
    warned = False
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self._fd)
        lost = os.fstat(self._fd).st_nlink == 0
        problem = "another run took it over (no heartbeat seen)" if lost else None
      except OSError as e:
        problem = f"cannot refresh it: {e.strerror or e}"
      if problem and not warned:
        logging.warning("the lock on workdir %s: %s", self.workdir, problem)
        warned = True

  def _exit_cleanly_on_sigterm(self) -> None:
    """A SIGTERM outside the training loop (which saves first) exits through __exit__, so the
    lock is released. Several processes keep JAX's own SIGTERM handling untouched."""
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
      self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame) -> None:
  raise SystemExit(128 + signum)


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def _publish(key: str, message: str) -> None:
  """Process 0: tells the other processes the outcome ('' when the lock was taken)."""
  from jax._src import distributed  # noqa: PLC0415  (the coordination service's client)

  if distributed.global_state.client is not None:
    distributed.global_state.client.key_value_set(key, json.dumps({"error": message}))
  else:
    _broadcast(1 if message else 0)


def _wait_for_process_0(key: str) -> str:
  """Processes other than 0: process 0's error message, '' when it took the lock."""
  from jax._src import distributed  # noqa: PLC0415

  client = distributed.global_state.client
  if client is not None:
    return json.loads(client.blocking_key_value_get(key, int(PEER_TIMEOUT_S * 1000)))["error"]
  refused = _broadcast(0)
  return "process 0 could not take the workdir's lock (its output says why)" if refused else ""


def _broadcast(code: int) -> int:
  """Without a coordination service (a tiny compiled program): process 0's `code` to all."""
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return int(multihost_utils.broadcast_one_to_all(np.int32(code)))

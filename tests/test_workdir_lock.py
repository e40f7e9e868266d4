"""The workdir lock: one run per workdir. Live owners (checked by pid and /proc start time on this
host, by heartbeat age from another) are refused with one line and nothing written; stale or
garbled locks are taken over with a warning, by exactly one of several racing takers; release on
exit, exceptions and SIGTERM; several JAX processes share process 0's decision."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from jaxtricks import workdir_lock
from jaxtricks.workdir_lock import WorkdirBusy, WorkdirLock
from tests import support

HAS_PROC = os.path.exists("/proc/self/stat")
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="needs /proc (Linux)")


def _start_ticks(pid: int) -> int:
  """Field 22 (starttime) of /proc/PID/stat (proc(5)); field 2, the name, ends at the last ')'."""
  with open(f"/proc/{pid}/stat") as f:
    return int(f.read().rpartition(")")[2].split()[22 - 3])


def _lock(workdir) -> WorkdirLock:
  return WorkdirLock(str(workdir), process_index=0, process_count=1)


def _write_lock(workdir, mtime_age: float = 0.0, **fields) -> dict:
  """A lock file as another run would write it: this process's record with `fields` replaced."""
  workdir.mkdir(parents=True, exist_ok=True)
  record = dict(workdir_lock.own_record(), command=["launch.py", "--exp=lm"], **fields)
  path = workdir / workdir_lock.LOCK_NAME
  path.write_text(json.dumps(record))
  if mtime_age:
    os.utime(path, (time.time() - mtime_age, time.time() - mtime_age))
  return record


def _owner(workdir) -> dict:
  return json.loads((workdir / workdir_lock.LOCK_NAME).read_text())


@pytest.fixture
def sleeper():
  proc = subprocess.Popen(["sleep", "30"])
  yield proc
  proc.kill()
  proc.wait()


@pytest.fixture
def gone_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()  # exited and reaped: no such process any more
  return proc.pid


def _refused(workdir) -> str:
  before = support.file_digests(workdir)
  names = sorted(os.listdir(workdir))
  with pytest.raises(WorkdirBusy) as err:
    with _lock(workdir):
      pytest.fail("a live lock was taken")
  assert support.file_digests(workdir) == before and sorted(os.listdir(workdir)) == names
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"workdir {workdir} is in use")
  assert "wait for it to finish or use another --workdir" in message
  return message


def _taken_over(workdir, caplog) -> str:
  with caplog.at_level(logging.WARNING), _lock(workdir):
    assert _owner(workdir)["pid"] == os.getpid()
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and warnings[0].startswith(f"workdir {workdir}: took over the lock")
  return warnings[0]


@needs_proc
def test_the_lock_file_names_this_process_and_release_removes_it(tmp_path):
  workdir = tmp_path / "run"  # created by the lock
  with _lock(workdir):
    owner = _owner(workdir)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert owner["proc_start"] == _start_ticks(os.getpid())
    assert owner["command"] == sys.argv
    time.strptime(owner["started"], "%Y-%m-%d %H:%M:%S %z")
    assert os.listdir(workdir) == [workdir_lock.LOCK_NAME]  # no temporary file left
  assert os.listdir(workdir) == []


def test_release_on_an_exception(tmp_path):
  with pytest.raises(ZeroDivisionError), _lock(tmp_path):
    assert (tmp_path / workdir_lock.LOCK_NAME).exists()
    _ = 1 / 0
  assert os.listdir(tmp_path) == []


def test_heartbeat_refreshes_the_mtime(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with _lock(tmp_path):
    path = tmp_path / workdir_lock.LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5


def test_sigterm_exits_through_the_release(tmp_path):
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as err, _lock(tmp_path):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # interrupted by the handler
  assert err.value.code == 128 + signal.SIGTERM
  assert os.listdir(tmp_path) == []
  assert signal.getsignal(signal.SIGTERM) is handler


@needs_proc
def test_a_live_process_on_this_host_is_refused_naming_pid_and_host(tmp_path, sleeper):
  _write_lock(tmp_path, mtime_age=3600, pid=sleeper.pid, proc_start=_start_ticks(sleeper.pid))
  message = _refused(tmp_path)  # an old heartbeat does not matter on this host
  assert f"pid {sleeper.pid} on host {socket.gethostname()}, started " in message


def test_the_lock_of_an_exited_process_is_taken_over_with_a_warning(tmp_path, gone_pid, caplog):
  _write_lock(tmp_path, pid=gone_pid)
  warning = _taken_over(tmp_path, caplog)
  assert f"pid {gone_pid} on host {socket.gethostname()}" in warning
  assert warning.endswith(f"pid {gone_pid} is gone")


@needs_proc
def test_a_reused_pid_is_stale(tmp_path, sleeper, caplog):
  _write_lock(tmp_path, pid=sleeper.pid, proc_start=_start_ticks(sleeper.pid) - 1)
  assert _taken_over(tmp_path, caplog).endswith(f"pid {sleeper.pid} now belongs to another "
                                                "process")


@needs_proc
def test_this_host_before_a_reboot_is_stale(tmp_path, sleeper, caplog):
  _write_lock(tmp_path, pid=sleeper.pid, proc_start=_start_ticks(sleeper.pid),
              boot_id="00000000-0000-0000-0000-000000000000")
  assert _taken_over(tmp_path, caplog).endswith("this host has rebooted since")


@pytest.mark.parametrize("where", [{"host": "node-elsewhere-7"}, {"pid_ns": "pid:[1]"}],
                         ids=["another_host", "another_container"])
def test_another_host_is_live_while_its_heartbeat_is_fresh(tmp_path, gone_pid, caplog, where):
  _write_lock(tmp_path, mtime_age=20, pid=gone_pid, **where)  # its pid means nothing here
  message = _refused(tmp_path)
  assert f"pid {gone_pid} on host {where.get('host', socket.gethostname())}" in message
  assert "its last heartbeat was 20 s ago; it counts as gone after 60 s" in message
  os.utime(tmp_path / workdir_lock.LOCK_NAME, (time.time() - 90, time.time() - 90))
  assert _taken_over(tmp_path, caplog).endswith("no heartbeat for 90 s")


@pytest.mark.parametrize("data", [b"", b'{"pid": 12', b"\xff\xfe\x00", b"[1, 2]",
                                  b'{"pid": "1", "host": "x"}'])
def test_a_garbled_lock_file_is_stale(tmp_path, caplog, data):
  path = tmp_path / workdir_lock.LOCK_NAME
  path.write_bytes(data)
  os.utime(path, (time.time() - 5, time.time() - 5))
  warning = _taken_over(tmp_path, caplog)
  assert "the lock of an unknown run: its lock file is unreadable" in warning


def test_an_unwritable_workdir_is_one_user_error(tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root ignores file permissions")
  tmp_path.chmod(0o555)
  try:
    with pytest.raises(workdir_lock.WorkdirLockError, match=r"is not writable: Permission denied"):
      _lock(tmp_path).__enter__()
  finally:
    tmp_path.chmod(0o755)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("round_", range(5))  # a lost race shows in about half the rounds
def test_racing_threads_taking_over_one_stale_lock_exactly_one_wins(tmp_path, gone_pid, round_):
  _write_lock(tmp_path, pid=gone_pid)
  n = 8
  barrier, outcomes, locks = threading.Barrier(n), [None] * n, [_lock(tmp_path) for _ in range(n)]

  def take(i):
    barrier.wait()
    try:
      locks[i].acquire()
      outcomes[i] = "won"
    except WorkdirBusy:
      outcomes[i] = "refused"

  threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(outcomes) == ["refused"] * (n - 1) + ["won"]  # the winner's pid is alive
  winner = locks[outcomes.index("won")]
  assert os.path.samestat(os.stat(winner.path), os.fstat(winner._fd))
  for lock in locks:
    lock.release()
  assert os.listdir(tmp_path) == []  # no claim or temporary file left


_TAKER = textwrap.dedent("""
    import os, sys, time
    from jaxtricks.workdir_lock import WorkdirBusy, WorkdirLock
    workdir = sys.argv[1]
    while not os.path.exists(os.path.join(workdir, "..", "go")):
      time.sleep(0.001)
    lock = WorkdirLock(workdir, process_index=0, process_count=1)
    try:
      lock.acquire()
    except WorkdirBusy:
      print("refused", flush=True)
      sys.exit(0)
    print("won", flush=True)
    while not os.path.exists(os.path.join(workdir, "..", "stop")):
      time.sleep(0.01)
    lock.release()
""")


def test_racing_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path, gone_pid):
  workdir = tmp_path / "run"
  _write_lock(workdir, pid=gone_pid)
  env = support.subprocess_env()
  procs = [subprocess.Popen([sys.executable, "-c", _TAKER, str(workdir)], cwd=support.REPO,
                            env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
  try:
    time.sleep(1.0)  # all started and waiting
    (tmp_path / "go").touch()
    outcomes = {p.pid: p.stdout.readline().strip() for p in procs}
    assert sorted(outcomes.values()) == ["refused"] * 3 + ["won"], outcomes
    winner = [pid for pid, outcome in outcomes.items() if outcome == "won"][0]
    assert _owner(workdir)["pid"] == winner
    (tmp_path / "stop").touch()
    assert all(p.wait(timeout=30) == 0 for p in procs)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert os.listdir(workdir) == []


_PROCESS = textwrap.dedent("""
    import sys
    import jax
    from jaxtricks.errors import UserError
    from jaxtricks.workdir_lock import WorkdirLock
    address, index, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(address, num_processes=2, process_id=index)
    try:
      with WorkdirLock(workdir) as lock:
        print("held" if lock._fd is not None else "not held", flush=True)
    except UserError as e:
      print("error:", e, flush=True)
""")


def _two_processes(workdir) -> list[str]:
  address = f"127.0.0.1:{support.free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, address, str(i), str(workdir)],
                            cwd=support.REPO, env=support.subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  return [out.strip() for out, _ in outputs]


@needs_proc
def test_several_processes_follow_process_0(tmp_path, sleeper):
  """Two JAX processes: process 0 alone holds the lock; on a live lock both get its refusal."""
  assert _two_processes(tmp_path / "free") == ["held", "not held"]
  assert os.listdir(tmp_path / "free") == []
  busy = tmp_path / "busy"
  _write_lock(busy, pid=sleeper.pid, proc_start=_start_ticks(sleeper.pid))
  before = support.file_digests(busy)
  outputs = _two_processes(busy)
  assert outputs[0] == outputs[1] and outputs[0].startswith(f"error: workdir {busy} is in use")
  assert support.file_digests(busy) == before


@needs_proc
def test_launch_on_a_workdir_in_use_exits_2_with_one_line_and_touches_nothing(tmp_path, sleeper):
  workdir = tmp_path / "run"
  _write_lock(workdir, pid=sleeper.pid, proc_start=_start_ticks(sleeper.pid))
  (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
  before, names = support.file_digests(workdir), sorted(os.listdir(workdir))
  proc = support.launch("--exp=lm", "--preset=smoke", f"--workdir={workdir}")
  assert proc.returncode == 2, support.describe(proc)
  assert "Traceback" not in proc.stderr + proc.stdout
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [proc.stderr.rstrip().splitlines()[-1]], support.describe(proc)
  assert errors[0].startswith(f"error: workdir {workdir} is in use by another run (pid "
                              f"{sleeper.pid} on host {socket.gethostname()}, started ")
  assert support.file_digests(workdir) == before and sorted(os.listdir(workdir)) == names

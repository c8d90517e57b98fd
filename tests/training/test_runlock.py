"""The run-directory lock: acquire, release, live, stale, corrupt and foreign locks;
the run directory made with the lock and removed again when nothing was written in
it; an --output the OS will not let us write (issue 25)."""

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from kgreedy.base.errors import KgreedyError
from kgreedy.training.runlock import RunLock


def write_lock(run_dir, pid, host=None, started="2024-01-01T00:00:00+00:00"):
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": started}
    (run_dir / ".lock").write_text(json.dumps(holder))


def read_lock(run_dir):
    return json.loads((run_dir / ".lock").read_text())


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def finished_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped, so the pid no longer names any process
    return proc.pid


def test_acquire_writes_holder_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    holder = read_lock(tmp_path)
    assert holder["pid"] == os.getpid()
    assert holder["host"] == socket.gethostname()
    assert holder["started"]
    assert lock.warning is None
    # Only the lock is left behind: no temp or stale files.
    assert sorted(os.listdir(tmp_path)) == [".lock"]
    lock.release()
    assert not (tmp_path / ".lock").exists()
    lock.release()  # idempotent
    assert os.listdir(tmp_path) == []


def test_context_manager_releases_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path) as lock:
            assert isinstance(lock, RunLock)
            assert read_lock(tmp_path)["pid"] == os.getpid()
            raise RuntimeError("boom")
    assert not (tmp_path / ".lock").exists()


def test_live_holder_is_refused(tmp_path, live_pid):
    write_lock(tmp_path, live_pid, started="2024-05-06T07:08:09+00:00")
    with pytest.raises(KgreedyError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert message.startswith("run_dir: is in use by another kgreedy process "
                              f"(pid {live_pid} on {socket.gethostname()} since "
                              "2024-05-06T07:08:09+00:00); wait for it to finish or stop it")
    assert str(tmp_path) in message
    assert read_lock(tmp_path)["pid"] == live_pid  # untouched


def test_stale_holder_is_taken_over_with_warning(tmp_path):
    dead = finished_pid()
    write_lock(tmp_path, dead)
    lock = RunLock(tmp_path)
    warning = lock.acquire()
    assert warning is lock.warning
    assert f"pid {dead}" in warning and "no longer running" in warning
    assert read_lock(tmp_path)["pid"] == os.getpid()
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # the stale file is gone
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_own_pid_is_treated_as_stale(tmp_path):
    write_lock(tmp_path, os.getpid(), started="2000-01-01T00:00:00+00:00")
    lock = RunLock(tmp_path)
    assert "earlier process" in lock.acquire()
    assert read_lock(tmp_path)["started"] != "2000-01-01T00:00:00+00:00"
    lock.release()


@pytest.mark.parametrize("content", ["", "{\"pid\": 12", "[1, 2]", "{\"pid\": \"x\", "
                                     "\"host\": \"h\", \"started\": \"t\"}", "\x00\xff"])
def test_corrupt_lock_is_taken_over(tmp_path, content):
    (tmp_path / ".lock").write_bytes(content.encode("latin-1"))
    lock = RunLock(tmp_path)
    warning = lock.acquire()
    assert "empty or unreadable" in warning
    assert read_lock(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_release_keeps_a_lock_another_pid_holds(tmp_path, live_pid):
    lock = RunLock(tmp_path)
    lock.acquire()
    # Someone else took the lock over after (say) deleting ours by hand.
    write_lock(tmp_path, live_pid)
    lock.release()
    assert read_lock(tmp_path)["pid"] == live_pid


def test_lock_on_another_host_is_refused(tmp_path):
    write_lock(tmp_path, finished_pid(), host="some-other-host.invalid")
    with pytest.raises(KgreedyError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert "some-other-host.invalid" in message
    assert f"delete {tmp_path / '.lock'}" in message
    assert read_lock(tmp_path)["host"] == "some-other-host.invalid"


def test_second_lock_in_another_process_is_refused(tmp_path):
    # A real second process, not a hand-written lock file: the full path.
    with RunLock(tmp_path):
        code = ("import sys; from kgreedy.training.runlock import RunLock; "
                "from kgreedy.base.errors import KgreedyError\n"
                "try:\n    RunLock(sys.argv[1]).acquire()\n"
                "except KgreedyError as e:\n    print(e); sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stderr
        assert f"pid {os.getpid()}" in done.stdout
    assert not (tmp_path / ".lock").exists()


def test_takeover_race_loser_does_not_steal_the_winners_lock(tmp_path, live_pid, monkeypatch):
    # Two processes judge one stale lock; the other wins and writes its own lock
    # before we move the stale one aside. We must put the winner's lock back and
    # refuse, not delete it.
    write_lock(tmp_path, finished_pid())
    judge = RunLock._judge

    def judge_then_lose_the_race(self, seen, host):
        warning = judge(self, seen, host)
        write_lock(tmp_path, live_pid)
        return warning

    monkeypatch.setattr(RunLock, "_judge", judge_then_lose_the_race)
    with pytest.raises(KgreedyError, match=f"pid {live_pid}"):
        RunLock(tmp_path).acquire()
    assert read_lock(tmp_path)["pid"] == live_pid
    assert sorted(os.listdir(tmp_path)) == [".lock"]


# ------------------------------------------- creating the run directory ----

def test_create_makes_the_directory_with_the_lock_and_release_removes_it_empty(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    lock = RunLock(run_dir, create=True)
    lock.acquire()
    assert lock.created == [str(tmp_path / "runs"), str(run_dir)]
    assert read_lock(run_dir)["pid"] == os.getpid()
    lock.release()
    assert os.listdir(tmp_path) == []  # the parent it made too: nothing was written


def test_release_keeps_a_created_directory_that_holds_files(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    with RunLock(run_dir, create=True):
        (run_dir / "summary.json").write_text("{}")
    assert sorted(os.listdir(run_dir)) == ["summary.json"]


def test_release_never_removes_a_directory_it_did_not_make(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir, create=True) as lock:
        assert lock.created == []
    assert run_dir.is_dir() and os.listdir(run_dir) == []


def test_a_refused_create_leaves_the_live_holders_directory_alone(tmp_path, live_pid):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_lock(run_dir, live_pid)
    with pytest.raises(KgreedyError, match=f"pid {live_pid}"):
        RunLock(run_dir, create=True).acquire()
    assert read_lock(run_dir)["pid"] == live_pid


def test_check_refuses_a_live_holder_and_leaves_a_stale_lock_in_place(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(KgreedyError, match=f"is in use by another kgreedy process "
                                           f"\\(pid {live_pid} "):
        RunLock(tmp_path).check()
    dead = finished_pid()
    write_lock(tmp_path, dead)
    RunLock(tmp_path).check()  # stale: passes, and the lock stays for acquire to report
    assert read_lock(tmp_path)["pid"] == dead
    RunLock(tmp_path / "absent").check()  # no directory, no lock: nothing holds it


# ------------------------------------------------ an unwritable --output ----

def test_a_parent_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(KgreedyError) as info:
        RunLock(tmp_path / "afile" / "run", create=True).acquire()
    assert str(info.value) == (f"run_dir: cannot be created (Not a directory: "
                               f"{tmp_path / 'afile'}); received "
                               f"'{tmp_path / 'afile' / 'run'}'")


def read_only_below(monkeypatch, root):
    """os.mkdir as on a read-only file system mounted at `root` (tests run as root,
    whom permission bits do not stop)."""
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if os.fspath(path).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)


def test_a_read_only_file_system_is_one_error_and_leaves_no_parent(tmp_path, monkeypatch):
    read_only_below(monkeypatch, tmp_path / "new" / "ro")
    with pytest.raises(KgreedyError) as info:
        RunLock(tmp_path / "new" / "ro" / "run", create=True).acquire()
    assert str(info.value) == (f"run_dir: cannot be created (Read-only file system: "
                               f"{tmp_path / 'new' / 'ro'}); received "
                               f"'{tmp_path / 'new' / 'ro' / 'run'}'")
    assert os.listdir(tmp_path) == []  # "new", made on the way, is removed again


@pytest.mark.parametrize("code,raises", [(errno.EROFS, KgreedyError),
                                         (errno.EACCES, KgreedyError),
                                         (errno.ENOSPC, OSError)])
def test_a_lock_file_that_cannot_be_written(tmp_path, monkeypatch, code, raises):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".lock.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(raises) as info:
        RunLock(tmp_path).acquire()
    if raises is KgreedyError:
        assert str(info.value) == (f"run_dir: cannot be written ({os.strerror(code)}); "
                                   f"received {str(tmp_path)!r}")
    else:  # a full disk is a fault with its own line and status (kgreedy.base.faults)
        assert info.value.errno == errno.ENOSPC and not isinstance(info.value, KgreedyError)

"""A lock file that stops two `train` processes from writing one run directory."""

import datetime
import errno
import json
import os
import socket
import tempfile
import uuid

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import make_dirs, remove_empty_dirs

LOCK_NAME = ".lock"
_ATTEMPTS = 10


class RunLock:
    """`RUN_DIR/.lock`, holding the JSON {"pid", "host", "started"} of its holder.

    A lock left behind by a dead process (a crash, SIGKILL) is taken over with a
    warning rather than blocking the run forever; a live holder's never is.

    With `create`, `acquire` makes the run directory (and its missing parents) and
    takes the lock in one step, so that of two processes on one new directory
    exactly one holds it before either writes or removes anything there, and
    `release` removes the directories it made if they are then empty: a run that
    wrote nothing leaves nothing (docs/DESIGN.md, "From a recipe to an export").

    Args:
        run_dir: the run directory (`--output`); it must exist unless `create`.
        create: make `run_dir` if it is missing.

    Attributes:
        warning: a message about a stale lock that `acquire` took over, for the
            caller to print, or None.
        created: the directories `acquire` made, outermost first.
    """

    def __init__(self, run_dir, create=False):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.create = create
        self.warning = None
        self.created = []
        self._content = None  # the bytes we wrote while we hold the lock

    def check(self):
        """Raises if a live process holds the lock, as `acquire` would; reads only.

        A stale or unreadable lock passes and stays, for `acquire` to take over
        and report.

        Raises:
            KgreedyError: a live process on this host, or any process on another
                host, holds the lock.
        """
        try:
            with open(self.path, "rb") as f:
                seen = f.read()
        except OSError:
            return  # no lock (or no directory): nothing holds it
        self._judge(seen, socket.gethostname())

    def acquire(self):
        """Takes the lock, taking over a stale one.

        Returns:
            The stale-lock warning (also in `self.warning`), or None.

        Raises:
            KgreedyError: a live process on this host, or any process on another
                host, holds the lock; or the directory cannot be created or
                written (a read-only file system, a parent that is a file).
        """
        host = socket.gethostname()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        content = json.dumps({"pid": os.getpid(), "host": host, "started": started}).encode()
        try:
            return self._acquire(content, host)
        except BaseException:
            remove_empty_dirs(self.created)  # refused: leave no directory behind
            raise

    def _acquire(self, content, host):
        # Each attempt either creates the lock, refuses, or moves a stale lock aside;
        # losing a race to another process just means looking again.
        for _ in range(_ATTEMPTS):
            if self.create:
                self._make_dirs()
            try:
                made = self._create(content)
            except FileNotFoundError as e:
                if self.create:
                    continue  # the empty directory was removed by the process that made it
                raise _unwritable(e, self.run_dir) from None
            except OSError as e:
                if e.errno in _DISK_FULL:
                    raise  # a fault with its own line and status (kgreedy.base.faults)
                raise _unwritable(e, self.run_dir) from None
            if made:
                self._content = content
                return self.warning
            try:
                with open(self.path, "rb") as f:
                    seen = f.read()
            except FileNotFoundError:
                continue  # released between our create and our read
            warning = self._judge(seen, host)
            if self._move_aside(seen):
                self.warning = warning
        raise KgreedyError("run_dir", "could not take the run lock: other processes keep "
                           "taking it", self.run_dir)

    def release(self):
        """Removes the lock if it is still ours, never another process's; then the
        directories `acquire` made, those that are empty. Idempotent."""
        if self._content is None:
            return
        try:
            with open(self.path, "rb") as f:
                ours = f.read() == self._content
            if ours:
                os.unlink(self.path)
        except FileNotFoundError:
            pass  # removed by hand; nothing of ours is left to release
        self._content = None
        remove_empty_dirs(self.created)  # only empty ones: never what a run wrote

    def _make_dirs(self):
        """Makes the run directory and its missing parents, noting each one made."""
        try:
            make_dirs(self.run_dir, self.created)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise
            raise _unwritable(e, self.run_dir, e.filename or self.run_dir) from None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _create(self, content):
        """Creates the lock with its content in one step; False if it exists."""
        # Writing a temp file then hard-linking it makes the lock appear complete,
        # so no other process ever reads a half-written lock and calls it corrupt.
        fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + ".", suffix=".tmp", dir=self.run_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:
                pass  # no hard links here (some network or FUSE file systems)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            return True
        finally:
            os.unlink(tmp)

    def _judge(self, seen, host):
        """Raises if the lock `seen` is held; else returns the takeover warning."""
        try:
            holder = json.loads(seen.decode())
            pid, holder_host, since = holder["pid"], holder["host"], holder["started"]
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise ValueError(pid)
        except (ValueError, TypeError, KeyError):
            return (f"{self.path} was empty or unreadable (a process crashed while "
                    f"writing it?); taking it over")
        who = f"pid {pid} on {holder_host} since {since}"
        if holder_host != host:
            raise KgreedyError("run_dir", f"is locked by {who}, whose liveness cannot be "
                               f"checked from {host}; if you are sure no process on "
                               f"{holder_host} uses it, delete {self.path}", self.run_dir)
        # A pid equal to ours was left by an earlier process that had our pid (in
        # containers training often runs as the same small pid every time).
        if pid == os.getpid():
            return (f"{self.path} was left by {who}, an earlier process with this "
                    f"process's pid; taking it over")
        if _alive(pid):
            raise KgreedyError("run_dir", f"is in use by another kgreedy process ({who}); "
                               f"wait for it to finish or stop it", self.run_dir)
        return f"{self.path} was left by {who}, which is no longer running; taking it over"

    def _move_aside(self, seen):
        """Renames the stale lock away; True if it was still the one we judged."""
        # Rename is atomic, so of two processes taking over one stale lock only one
        # moves it; the other moves nothing or the winner's fresh lock, and must
        # then put that back.
        aside = f"{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = f.read()
        if moved == seen:
            os.unlink(aside)
            return True
        try:
            os.link(aside, self.path)
        except FileExistsError:
            pass  # a third process created a lock meanwhile; it holds the run now
        except OSError:
            os.replace(aside, self.path)  # no hard links: put it back by renaming
            return False
        os.unlink(aside)
        return False


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _unwritable(error, run_dir, path=None):
    """The one line for a run directory the OS will not let us write."""
    reason = error.strerror or type(error).__name__
    return KgreedyError("run_dir", f"cannot be {'created' if path else 'written'} "
                        f"({reason}{f': {path}' if path else ''})", run_dir)


def contents(run_dir, locked=False):
    """The names in `run_dir` besides this process's lock (`locked`: the lock file
    there is ours); empty for a directory that does not exist.

    Raises:
        KgreedyError: the directory cannot be listed.
    """
    try:
        names = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()
    except OSError as e:
        raise KgreedyError("run_dir", f"cannot be read ({e.strerror})", run_dir) from None
    return names - ({LOCK_NAME} if locked else set())


def _alive(pid):
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    except OverflowError:
        return False  # larger than any pid the system can have
    return True

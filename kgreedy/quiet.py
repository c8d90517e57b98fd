"""Hides TensorFlow's C++ start-up log lines from the command-line tools' stderr.

Importing TensorFlow, and later initialising its devices, writes lines such as::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1795796898.297869    2080 port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:1795796898.298199    2080 cudart_stub.cc:31] Could not find cuda drivers ...
    E0000 00:00:1795796902.224588    2080 cuda_platform.cc:52] failed call to cuInit: ...

They come from absl before its logging is initialised, so `TF_CPP_MIN_LOG_LEVEL` does
not silence them, and the C++ code writes them straight to file descriptor 2, so
replacing `sys.stderr` does not either. `install` therefore points descriptor 2 at a
pipe, read by a forked forwarder process that copies everything to the real stderr
except lines of exactly those shapes (`NOISE`). Anything else, Python warnings,
tracebacks, `kgreedy: error:` lines and every other C++ log line, goes through
unchanged and in order.

A process rather than a thread forwards because a thread needs the GIL: C++ code that
holds it (the import of TensorFlow does) and fills the pipe would wait for a reader
that waits for the GIL. A process also outlives a crash of the command (abort,
segfault, `os._exit`, SIGKILL), so the last lines before it, often the only
explanation, still arrive: it reads until every writer has gone.

Only the command-line front ends call `install`, first thing when run as
`__main__`; importing kgreedy as a library never touches the process's stderr.
"""

import atexit
import os
import re
import select
import signal
import sys
import time

# (source file, log levels, message start): a C++ log line is dropped only when its
# file, its level and the start of its message all match. Levels are I, W and E;
# fatal (F) lines are never dropped.
NOISE = (
    # import: oneDNN notice; CUDA runtime probing on a machine without it
    ("port.cc", "I", r"oneDNN custom operations are on\b"),
    ("cudart_stub.cc", "IW", r"Could not (?:find cuda drivers|load dynamic library)"),
    # import: CPU instruction sets the binary was not built for (continuation below)
    ("cpu_feature_guard.cc", "I", r"(?:This TensorFlow binary is optimized to use "
                                  r"available CPU instructions|Your CPU supports "
                                  r"instructions that this TensorFlow binary)"),
    # import on GPU builds: plugins registered twice; TensorRT missing
    ("cuda_dnn.cc", "E", r"Unable to register cuDNN factory"),
    ("cuda_fft.cc", "E", r"Unable to register cuFFT factory"),
    ("cuda_blas.cc", "E", r"Unable to register cuBLAS factory"),
    ("computation_placer.cc", "W", r"computation placer already registered"),
    ("py_utils.cc", "W", r"TF-TRT Warning: Could not find TensorRT"),
    # first device initialisation without a usable GPU
    ("cuda_platform.cc", "E", r"failed call to cuInit"),
    ("cuda_driver.cc", "E", r"failed call to cuInit"),
    ("cuda_diagnostics.cc", "I", r"(?:retrieving CUDA diagnostic information|hostname:|"
                                 r"libcuda reported version|kernel reported version|"
                                 r"kernel version seems to match|kernel driver does not "
                                 r"appear to be running)"),
    ("cuda_executor.cc", "IW", r"(?:could not open file to read NUMA node|successful "
                               r"NUMA node read from SysFS had negative value)"),
    # first uint8 image op on a CPU without AVX-512 (decoding a folder's images): a
    # notice that a slower kernel is used, not an error
    ("util.cc", "E", r"oneDNN supports DT_UINT8 only on platforms with AVX-512"),
)

# absl's banner, printed once per TensorFlow shared library that logs.
BANNER = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called "
                    rb"are written to STDERR")
# The second line of cpu_feature_guard.cc's message (no log prefix of its own); dropped
# only right after a dropped cpu_feature_guard.cc line.
FEATURE_GUARD_CONTINUATION = re.compile(
    rb"To enable the following instructions: .*rebuild TensorFlow with the appropriate "
    rb"compiler flags\.")
# absl: `I0000 00:00:1795796898.297869    2080 port.cc:153] ...`;
# older TensorFlow (tsl): `2024-05-01 12:00:00.123456: I tensorflow/.../port.cc:113] ...`.
LOG_LINE = re.compile(
    rb"(?:(?P<absl>[IWE])\d{4} [\d:.]+ +\d+ |\d{4}-\d\d-\d\d [\d:.]+: (?P<tsl>[IWE]) )"
    rb"(?:[\w.-]*/)*(?P<file>[\w.-]+\.cc):\d+\] (?P<message>.*)")


def _by_file(noise):
    table = {}
    for file, levels, message in noise:
        table.setdefault(file.encode(), []).append((levels.encode(),
                                                    re.compile(message.encode())))
    return table


_NOISE = _by_file(NOISE)  # {file: [(levels, message), ...]}, in bytes as read from fd 2

MAX_NOISE = 4096     # bytes; a longer partial line is not noise and is not held
HOLD_SECONDS = 0.2   # a partial line that might be noise waits this long for its end
DRAIN_SECONDS = 5.0  # at exit, the longest wait for the forwarder to write the rest

# (pid of the process that installed, descriptor of the real stderr, forwarder's pid)
_installed = None


def is_noise(line, after_feature_guard=False):
    """Whether one complete stderr line (bytes, without its newline) is start-up noise.

    Args:
        line: the line.
        after_feature_guard: whether the line before was a dropped cpu_feature_guard.cc
            line, whose message continues on this line.

    Returns:
        True for the absl banner, a `NOISE` log line, or the feature guard's second line.
    """
    if BANNER.fullmatch(line):
        return True
    if after_feature_guard and FEATURE_GUARD_CONTINUATION.fullmatch(line):
        return True
    match = LOG_LINE.fullmatch(line)
    if not match:
        return False
    level = match["absl"] or match["tsl"]
    return any(level in levels and message.match(match["message"])
               for levels, message in _NOISE.get(match["file"], ()))


class LineFilter:
    """Drops noise lines from a byte stream fed in arbitrary pieces.

    Whole lines are judged. A partial line is held back only while it might still
    become a noise line (it starts like one); anything else, a progress bar redrawn
    with `\\r` for instance, passes at once, and the rest of its line follows it.
    """

    # First bytes of the noise shapes: absl levels, the banner's W, the feature guard
    # continuation's T, tsl's date.
    _MAY_BE_NOISE = frozenset(b"IWET0123456789")

    def __init__(self):
        self._held = b""           # the start of the current line, not yet judged
        self._passing = False      # the current line already started going out
        self._after_guard = False  # the last line was a dropped cpu_feature_guard line

    @property
    def holding(self):
        """Whether a partial line is held back."""
        return bool(self._held)

    def feed(self, data):
        """Returns what of `data` (bytes) can be written out now."""
        out, start = [], 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end + 1]
            start += len(piece)
            complete = end >= 0
            if self._passing:
                out.append(piece)
                self._passing = not complete
                continue
            self._held += piece
            if complete:
                line, self._held = self._held, b""
                text = line.rstrip(b"\r\n")
                dropped = is_noise(text, self._after_guard)
                self._after_guard = dropped and b"cpu_feature_guard.cc:" in text
                if not dropped:
                    out.append(line)
            elif (self._held[0] not in self._MAY_BE_NOISE
                  or len(self._held) > MAX_NOISE):
                out.append(self.release())
        return b"".join(out)

    def release(self):
        """Returns the held partial line; the rest of that line will pass too."""
        held, self._held = self._held, b""
        self._passing = bool(held)
        return held


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _forward(read_fd, out_fd):
    """The forwarder's loop: copies `read_fd` to `out_fd` through a `LineFilter`
    until every writer has closed the pipe."""
    line_filter, broken = LineFilter(), False

    def emit(data):
        nonlocal broken
        if data and not broken:
            try:
                _write_all(out_fd, data)
            except OSError:
                broken = True  # stderr closed: keep reading so writers never block

    while True:
        if line_filter is not None and line_filter.holding:
            ready, _, _ = select.select([read_fd], [], [], HOLD_SECONDS)
            if not ready:
                emit(line_filter.release())
                continue
        data = os.read(read_fd, 65536)
        if not data:
            break
        if line_filter is None:
            emit(data)
            continue
        try:
            emit(line_filter.feed(data))
        except Exception:  # a bug in the filter must not cost the user their output
            line_filter = None
            emit(data)
    if line_filter is not None:
        emit(line_filter.release())


def wants_verbose(argv):
    """Whether `argv` has `--verbose`, or a prefix of it as argparse accepts one."""
    for arg in argv:
        if arg == "--":
            return False
        if len(arg) > 2 and "--verbose".startswith(arg):
            return True
    return False


def install(argv=None):
    """Filters TensorFlow's start-up lines out of this process's stderr (fd 2).

    Call it before TensorFlow is imported. It does nothing with `--verbose` in
    `argv`, when already installed, once TensorFlow has been imported (too late:
    its import lines are out and its threads would be forked), or where `os.fork`
    or `signal.pthread_sigmask` does not exist (Windows). At exit (`atexit`, so also
    after `SystemExit` and after an uncaught exception's traceback) it restores fd 2
    and waits for the forwarder to write everything out, so lines written later
    (while the interpreter shuts down) follow in order, unfiltered.

    Args:
        argv: the command's arguments (default `sys.argv[1:]`).

    Returns:
        Whether the filter was installed by this call.
    """
    global _installed
    argv = sys.argv[1:] if argv is None else argv
    if (_installed is not None or wants_verbose(argv) or "tensorflow" in sys.modules
            or not hasattr(os, "fork") or not hasattr(signal, "pthread_sigmask")):
        return False
    for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
        if stream is not None:
            stream.flush()
    try:
        real = os.dup(2)
    except OSError:  # stderr closed (`2>&-`): nothing to filter
        return False
    read_fd, write_fd = os.pipe()
    # Ctrl-C, a preemption or a hang-up is meant for the command, which may still
    # have lines to say about it: the forwarder ignores them, and they are blocked
    # until it does, so one arriving during the fork cannot end it.
    ignored = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
               if hasattr(signal, name)]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ignored)
    try:
        pid = os.fork()
    except OSError:  # out of processes or memory: the command runs unfiltered
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in (real, read_fd, write_fd):
            os.close(fd)
        return False
    if pid == 0:  # the forwarder
        try:
            for signum in ignored:
                signal.signal(signum, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(write_fd)  # else the pipe never reaches its end
            os.close(real)
            # Not holding stdin and stdout lets a caller reading the command's stdout
            # see its end when the command ends.
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            _forward(read_fd, 2)
        finally:
            os._exit(0)  # never return into the command, never run its atexit
    os.close(read_fd)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _installed = (os.getpid(), real, pid)
    atexit.register(_restore)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # last: a Ctrl-C finds it all set
    return True


def _restore():
    """At exit: fd 2 back to the real stderr, then wait until the forwarder has
    written everything that went into the pipe."""
    pid, real, forwarder = _installed
    if os.getpid() != pid:
        return  # a forked child exiting normally: its lines still go through the pipe
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os.dup2(real, 2)  # closes our end of the pipe: the forwarder reads to its end
    os.close(real)
    # A child process still holding the pipe would keep the forwarder reading: wait
    # a bounded time; the forwarder goes on after we have gone.
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        try:
            if os.waitpid(forwarder, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.005)

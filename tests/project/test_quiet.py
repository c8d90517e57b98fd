"""The command-line tools hide TensorFlow's C++ start-up lines (kgreedy/quiet.py) and
nothing else: real warnings, tracebacks and `kgreedy: error:` lines arrive complete, in
order, with the exit status kept; `--verbose` shows everything."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kgreedy import quiet

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
QUICKSTART = str(ROOT / "recipes" / "quickstart.json")

# Start-up lines as TensorFlow 2.21 prints them on a CPU machine, then as GPU builds
# and older releases (tsl's prefix) print them.
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795796898.297869    2080 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results due to floating-point round-off "
    "errors from different computation orders. To turn them off, set the environment "
    "variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1795796898.298199    2080 cudart_stub.cc:31] Could not find cuda drivers "
    "on your machine, GPU will not be used.",
    "I0000 00:00:1795797018.303122    3672 cpu_feature_guard.cc:227] This TensorFlow binary "
    "is optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI FMA, in other "
    "operations, rebuild TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1795796902.224588    2080 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "E0000 00:00:1721234567.123456   12345 cuda_dnn.cc:8310] Unable to register cuDNN "
    "factory: Attempting to register factory for plugin cuDNN when one has already been "
    "registered",
    "W0000 00:00:1721234567.123456   12345 computation_placer.cc:177] computation placer "
    "already registered. Please check linkage and avoid linking the same target more "
    "than once.",
    "2024-05-01 12:00:00.123456: W tensorflow/compiler/tf2tensorrt/utils/py_utils.cc:38] "
    "TF-TRT Warning: Could not find TensorRT",
    "2024-05-01 12:00:00.123456: I tensorflow/core/util/port.cc:113] oneDNN custom "
    "operations are on.",
    "I0501 12:00:00.123456   12345 cuda_executor.cc:1015] successful NUMA node read from "
    "SysFS had negative value (-1), but there must be at least one NUMA node, so returning "
    "NUMA node zero.",
]
REAL = [
    "kgreedy: error: data.image_size: must be >= 1; received 0",
    "Traceback (most recent call last):",
    "/x/y.py:3: UserWarning: something real",
    # other C++ lines, fatal ones and near misses of the noise shapes
    "W0000 00:00:1795796898.1    2080 gpu_device.cc:2344] Cannot dlopen some GPU libraries.",
    "F0000 00:00:1795796898.1    2080 cpu_feature_guard.cc:200] The TensorFlow library was "
    "compiled to use AVX instructions, but these aren't available on your machine.",
    "E0000 00:00:1795796898.1    2080 cuda_platform.cc:60] could not allocate memory",
    "I0000 00:00:1795796898.1    2080 port.cc:153] something else from port.cc",
    "W0000 00:00:1795796898.1    2080 port.cc:153] oneDNN custom operations are on.",
    "note: I0000 00:00:1795796898.1 2080 port.cc:153] oneDNN custom operations are on.",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR!",
]
# The feature guard's second line is noise only right after the feature guard's line.
CONTINUATION = NOISE[4]

NOISE_PATTERN = re.compile(r"^(?:[IWE]\d{4} |WARNING: All log messages before absl)", re.M)


def filtered(chunks):
    line_filter = quiet.LineFilter()
    return b"".join(line_filter.feed(c) for c in chunks) + line_filter.release()


def test_noise_lines_are_dropped_and_real_lines_kept():
    lines = NOISE + REAL + [CONTINUATION]  # the last one: not after the feature guard
    data = "".join(line + "\n" for line in lines).encode()
    expected = "".join(line + "\n" for line in REAL + [CONTINUATION]).encode()
    assert filtered([data]) == expected
    # The same whatever the pieces the pipe delivers.
    assert filtered([data[i:i + 1] for i in range(len(data))]) == expected
    assert filtered([data[i:i + 97] for i in range(0, len(data), 97)]) == expected


def test_partial_lines_pass_at_once_unless_they_may_be_noise():
    line_filter = quiet.LineFilter()
    assert line_filter.feed(b"\r 10%|#") == b"\r 10%|#"  # a progress bar: at once
    assert line_filter.feed(b"#  ") == b"#  "
    assert line_filter.feed(b"| done\nI0000 00:00:1.5 7 port.cc") == b"| done\n"
    assert line_filter.holding
    assert line_filter.feed(b":1] oneDNN custom operations are on.\n") == b""
    assert line_filter.feed(b"Important") == b""  # might be noise: held...
    assert line_filter.release() == b"Important"  # ...until the forwarder's timeout
    assert line_filter.feed(b" news\n") == b" news\n"  # the rest of that line follows


def test_verbose_flag_is_read_as_argparse_does():
    assert quiet.wants_verbose(["r.json", "--verbose"])
    assert quiet.wants_verbose(["--verb", "r.json"])
    assert not quiet.wants_verbose(["r.json", "--dry-run"])
    assert not quiet.wants_verbose(["--", "--verbose"])
    assert not quiet.wants_verbose(["-v"])


def test_importing_the_command_modules_installs_nothing():
    from kgreedy import export, predict, probe, train, tune  # noqa: F401
    assert quiet._installed is None


# ------------------------------------------------- the filter in a process ----

def run_script(body, *args, timeout=60, **popen):
    """Runs `body` after `quiet.install(args)` in a fresh interpreter."""
    code = ("import os, sys, time\nfrom kgreedy import quiet\n"
            "first, second = quiet.install(sys.argv[1:]), quiet.install(sys.argv[1:])\n"
            "print('installed', first, second, flush=True)\n"
            + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, **popen)


WRITE_NOISE = f"""
noise = {NOISE!r}
def say(*lines):  # straight to fd 2, as TensorFlow's C++ code writes
    os.write(2, "".join(line + "\\n" for line in lines).encode())
say(noise[0], noise[1], "real line 1", *noise[2:])
print("python line 2", file=sys.stderr)
say("real line 3")
"""
REAL_LINES = ["real line 1", "python line 2", "real line 3"]


def test_exit_status_and_real_lines_survive_system_exit():
    proc = run_script(WRITE_NOISE + "raise SystemExit(3)")
    assert proc.returncode == 3
    assert proc.stdout == "installed True False\n"  # a second install does nothing
    assert proc.stderr.splitlines() == REAL_LINES


def test_traceback_arrives_complete_after_the_real_lines():
    proc = run_script(WRITE_NOISE + "def f():\n    raise ValueError('boom ' * 3000)\nf()")
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[:3] == REAL_LINES
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: " + "boom " * 3000
    assert not NOISE_PATTERN.search(proc.stderr)


def test_lines_written_before_a_crash_arrive():
    # os._exit skips atexit: the forwarder still copies what is in the pipe.
    proc = run_script(WRITE_NOISE + "os._exit(4)")
    assert proc.returncode == 4
    assert proc.stderr.splitlines() == REAL_LINES


def test_a_full_pipe_does_not_deadlock_even_while_holding_the_gil():
    # 4 MiB (64 pipe buffers) written by C code that keeps the GIL, as TensorFlow's
    # import does when it logs: a forwarding thread would wait for the GIL forever.
    body = WRITE_NOISE + """
import ctypes
data = b"".join(b"%07d %s\\n" % (i, b"x" * 56) for i in range(65536))
libc = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL
libc.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
written = 0
while written < len(data):
    written += libc.write(2, data[written:], len(data) - written)
say("last line")
"""
    proc = run_script(body, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert lines[:3] == REAL_LINES and lines[-1] == "last line"
    assert len(lines) == 3 + 65536 + 1
    assert lines[3 + 65535] == "0065535 " + "x" * 56


def test_verbose_shows_everything():
    proc = run_script(WRITE_NOISE, "--verbose")
    assert proc.stdout == "installed False False\n"
    assert proc.stderr.splitlines() == [NOISE[0], NOISE[1], REAL_LINES[0], *NOISE[2:],
                                        *REAL_LINES[1:]]


def test_ctrl_c_reaches_the_command_and_its_last_words_arrive():
    body = WRITE_NOISE + """
try:
    print("ready", flush=True)
    time.sleep(30)
except KeyboardInterrupt:
    print("kgreedy: interrupted", file=sys.stderr)
    raise SystemExit(130)
"""
    # SIGINT back to Python's own handler first: a test run started in the background
    # of a non-interactive shell hands its children SIGINT ignored.
    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from kgreedy import quiet\nquiet.install([])\n" + body)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    assert proc.stdout.readline() == "ready\n"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole process group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.splitlines() == REAL_LINES + ["kgreedy: interrupted"]


# ---------------------------------------------------------- the commands ----

def run_train(*args):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kgreedy.train", QUICKSTART, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc, time.perf_counter() - start


@pytest.mark.slow
def test_train_dry_run_prints_its_table_and_no_start_up_lines():
    proc, _ = run_train("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("recipe quickstart: greedy, 3 stages")
    assert "deployed model (trunk + stage 3 head)" in proc.stdout
    for needle in ("absl::InitializeLog", "oneDNN", "cuInit", "TensorFlow binary"):
        assert needle not in proc.stderr, proc.stderr

    verbose, _ = run_train("--dry-run", "--verbose")
    # The memory this machine has free changes between the two runs.
    def steady(stdout):
        return re.sub(r"(?:available|against the) [\d.,]+ [KMGT]?B", "available N", stdout)

    assert verbose.returncode == 0 and steady(verbose.stdout) == steady(proc.stdout)
    # Whatever else this machine prints (a GPU's device lines, say) is in both.
    assert filtered([verbose.stderr.encode()]).decode() == proc.stderr
    if not NOISE_PATTERN.search(verbose.stderr):
        pytest.skip("TensorFlow prints no start-up lines on this machine")


@pytest.mark.slow
def test_train_error_is_the_only_line():
    proc, _ = run_train("--set", "data.image_size=0", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr == "kgreedy: error: data.image_size: must be >= 1; received 0\n"

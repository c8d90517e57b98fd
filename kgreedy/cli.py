"""What every command-line front end shares: argument errors, exit statuses, and the
translation of library errors (which name parameters) into the flags a user typed."""

import argparse
import contextlib
import sys
import traceback

from kgreedy import quiet
from kgreedy.base import faults
from kgreedy.base.errors import Fault, KgreedyError, Stopped
from kgreedy.base.machine import available_bytes
from kgreedy.config.recipe import SEED_MAX
# The exit statuses of every front end, in one place (docs/DESIGN.md, "Command line").
# Those of a stop of the work are its `Stopped` class's, defined beside them: a
# non-finite loss 65, a lost worker 69, out of memory 71, a full disk 74, SIGTERM 75.
from kgreedy.base.errors import (EXIT_DISK_FULL, EXIT_LOST_WORKER,  # noqa: F401
                                 EXIT_NONFINITE_LOSS, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED)

EXIT_OK = 0
EXIT_FAILURE = 1  # anything unexpected; the traceback is printed
EXIT_USAGE = 2    # bad usage, recipe or data configuration: one line on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


def fail(message):
    """Prints `kgreedy: error: message` on stderr and exits with status 2."""
    print(f"kgreedy: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def positive_int(text):
    """argparse type: an integer >= 1, else the one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; received {text!r}")
    return value


def seed(text):
    """argparse type: a seed in 0..2**32-1 (what NumPy and scikit-learn accept), else
    the one-line usage error."""
    try:
        value = int(text) if len(text) <= 20 else None  # no 5,000-digit integers
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX}; "
                                         f"received {text[:40]!r}")
    return value


def add_verbose(parser):
    """Adds `--verbose` to a front end that imports TensorFlow. `kgreedy.quiet.install`
    reads it from `sys.argv` before argparse runs (and before TensorFlow is imported);
    argparse only has to accept and document it."""
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up log lines")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with kgreedy's one-line error format (exit status 2)."""

    def error(self, message):
        fail(message)


def run(main, argv=None):
    """Runs `main(argv)`, turning `KgreedyError` into one line and exit status 2, and
    `Stopped` (non-finite loss, preemption, a failed search) into one line and its
    status.

    A fault of the machine (`kgreedy.base.faults`: a lost worker, a full disk,
    exhausted memory) is one `kgreedy: error:` line and its status too, also when it
    reaches here as TensorFlow's or Python's own error; with `--verbose` among the
    arguments its traceback comes first. Any other error propagates: its traceback
    and status 1.
    """
    verbose = quiet.wants_verbose(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except KgreedyError as e:
        fail(str(e))
    except Stopped as e:
        return _stopped(e, verbose)
    except KeyboardInterrupt:
        print("kgreedy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        fault = faults.classify(e, available_memory=available_bytes)
        if fault is None:
            raise
        fault.__cause__ = e
        return _stopped(fault, verbose)


def _stopped(stopped, verbose):
    """Prints a `Stopped`'s line (after the traceback of a fault's error, if
    `verbose`); returns its exit status."""
    if verbose and isinstance(stopped, Fault):
        error = stopped.__cause__ or stopped
        traceback.print_exception(type(error), error, error.__traceback__)
    print(f"kgreedy: {stopped.prefix}{stopped}", file=sys.stderr)
    return stopped.exit_status


@contextlib.contextmanager
def flags(**names):
    """Re-raises a `KgreedyError` about a library parameter as one about its flag.

    The library names its own parameters (`stage: must be between 1 and 3`); a user
    of the command line typed `--stage`, so the front end maps one to the other:
    `with cli.flags(stage="--stage"): ...`.
    """
    try:
        yield
    except KgreedyError as e:
        if e.path in names:
            raise e.at(names[e.path]) from None
        raise

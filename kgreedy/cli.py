"""What every command-line front end shares: argument errors, exit statuses, and the
translation of library errors (which name parameters) into the flags a user typed."""

import argparse
import contextlib
import sys

from kgreedy.base.errors import KgreedyError, Stopped

EXIT_OK = 0
EXIT_FAILURE = 1  # anything unexpected; the traceback is printed
EXIT_USAGE = 2    # bad usage, recipe or data configuration: one line on stderr


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
    status."""
    try:
        return main(argv)
    except KgreedyError as e:
        fail(str(e))
    except Stopped as e:
        print(f"kgreedy: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("kgreedy: interrupted", file=sys.stderr)
        return 130


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

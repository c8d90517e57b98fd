"""What every command-line front end shares: argument errors and exit statuses."""

import argparse
import sys

from kgreedy.errors import KgreedyError

EXIT_OK = 0
EXIT_FAILURE = 1  # anything unexpected; the traceback is printed
EXIT_USAGE = 2    # bad usage, recipe or data configuration: one line on stderr


def fail(message):
    """Prints `kgreedy: error: message` on stderr and exits with status 2."""
    print(f"kgreedy: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with kgreedy's one-line error format (exit status 2)."""

    def error(self, message):
        fail(message)


def run(main, argv=None):
    """Runs `main(argv)`, turning `KgreedyError` into one line and exit status 2."""
    try:
        return main(argv)
    except KgreedyError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("kgreedy: interrupted", file=sys.stderr)
        return 130

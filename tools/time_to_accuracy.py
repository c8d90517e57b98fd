"""Time to accuracy: when each run first reached given eval accuracies, counted in
CPU (or wall) seconds and data passes, and its eval accuracy against that clock.

    python tools/time_to_accuracy.py RUN_DIR [RUN_DIR ...] [--target 0.6 --target 0.7 ...]
        [--clock cpu|wall] [--json OUT.json] [--plot OUT.png]

Prints a Markdown table, one row per run; `--json` writes the same figures and each
run's curve, `--plot` draws the curves. `--clock cpu` (the default) sums each
epoch's `cpu_seconds`, `--clock wall` its `wall_seconds`; the figures, and what
the clock counts, are `kgreedy.analysis.time_to_accuracy`'s. Bad input is one
`kgreedy: error:` line on stderr and exit status 2, before anything is written.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kgreedy import cli  # noqa: E402
from kgreedy.analysis import time_to_accuracy as tta  # noqa: E402
from kgreedy.base.files import write_json  # noqa: E402


def target(text):
    """argparse type: an accuracy in (0, 1], else the one-line usage error."""
    try:
        value = float(text)
    except ValueError:
        value = None
    # `not 0 < value` also rejects NaN, which every comparison fails.
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an accuracy in (0, 1]; received {text!r}")
    return value


def output_path(text):
    """argparse type: a file path whose directory exists, checked before any work so
    that a bad path fails with nothing written."""
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"must be a file in an existing directory; "
                                         f"received {text!r}")
    return text


def main(argv=None):
    parser = cli.ArgumentParser(prog="python tools/time_to_accuracy.py",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--target", type=target, action="append", default=[],
                        help="an eval accuracy in (0, 1]; repeat for more columns")
    parser.add_argument("--clock", choices=sorted(tta.CLOCKS), default="cpu",
                        help="sum each epoch's cpu_seconds (default) or wall_seconds")
    parser.add_argument("--json", type=output_path, help="also write the figures here")
    parser.add_argument("--plot", type=output_path, help="draw the curves into this PNG")
    args = parser.parse_args(argv)
    # Every run is read and checked before anything is printed or written.
    result = tta.figures(args.runs, args.target, args.clock)
    print(tta.markdown(result["runs"], result["targets"], args.clock))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        tta.plot(result["runs"], result["targets"], args.clock, args.plot)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))

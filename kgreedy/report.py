"""`python -m kgreedy.report RUN_DIR [--output DIR]`: plots a run's curves and its
accuracy against depth and writes a Markdown report (`kgreedy.analysis.report`)."""

from kgreedy import cli
from kgreedy.analysis.report import write_report


def main(argv=None):
    """Parses the arguments, writes the report, prints its path."""
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.report",
        description="Plot a run's training curves and accuracy vs depth, and write "
                    "a Markdown report (default: RUN_DIR/report/report.md).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory of kgreedy.train")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help="report directory (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    with cli.flags(run_dir="RUN_DIR", output="--output"):
        print(write_report(args.run_dir, args.output))
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

"""`python -m kgreedy.probe RUN_DIR [--max-train N] [--max-eval N] [--stage N]
[--seed S]`: fits a linear probe on the output of every module (block, or module
of a split model) of a trained run (`kgreedy.analysis.probe`) and prints the table."""

import sys

if __name__ == "__main__":  # first: filters TensorFlow's C++ start-up lines (kgreedy.quiet)
    from kgreedy import quiet
    quiet.install(sys.argv[1:])

from kgreedy import cli
from kgreedy.analysis.probe import print_table, probe_run
from kgreedy.training.rundir import RunDir

FLAGS = {"run_dir": "RUN_DIR", "stage": "--stage", "max_train": "--max-train",
         "max_eval": "--max-eval"}


def main(argv=None):
    """Parses the arguments, probes, prints the table and what was written."""
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.probe",
        description="Fit a linear probe (logistic regression) on the output of every "
                    "module (block) of a trained run's trunk; write "
                    "RUN_DIR/probes.json and probes.png.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory of kgreedy.train")
    parser.add_argument("--max-train", type=cli.positive_int, default=5000, metavar="N",
                        help="train examples to fit on, at most (default: 5000)")
    parser.add_argument("--max-eval", type=cli.positive_int, default=2000, metavar="N",
                        help="eval examples to measure on, at most (default: 2000)")
    parser.add_argument("--stage", type=cli.positive_int, default=None, metavar="N",
                        help="probe modules 1..N (default: every module of the "
                             "last finished stage)")
    parser.add_argument("--seed", type=cli.seed, default=0, metavar="S",
                        help="seeds the samples and the regression (default: 0)")
    cli.add_verbose(parser)
    args = parser.parse_args(argv)
    with cli.flags(**FLAGS):
        result = probe_run(args.run_dir, args.max_train, args.max_eval, args.stage,
                           args.seed)
    print_table(result)
    print(f"wrote {RunDir(result['run']).probes} and {RunDir.PROBES_PLOT}")
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

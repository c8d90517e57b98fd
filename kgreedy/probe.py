"""`python -m kgreedy.probe RUN_DIR [--data DATA.json] [--max-train N] [--max-eval N]
[--stage N] [--seed S]`: fits a linear probe on the output of every module (block,
or module of a split model) of a trained run (`kgreedy.analysis.probe`) and prints
the table.

`--data DATA.json` (a recipe, or a recipe's data section alone) gives the data to
probe on: a `kgreedy.fit` run, which records no data source, needs it; for a run of
`kgreedy.train` it replaces the recorded data (moved data, another split). The
data's image shape and classes must be the net's."""

import sys

if __name__ == "__main__":  # first: filters TensorFlow's C++ start-up lines (kgreedy.quiet)
    from kgreedy import quiet
    quiet.install(sys.argv[1:])

from kgreedy import cli
from kgreedy.analysis.probe import print_table, probe_run
from kgreedy.training.rundir import RunDir

FLAGS = {"run_dir": "RUN_DIR", "stage": "--stage", "max_train": "--max-train",
         "max_eval": "--max-eval", "data": "--data"}


def main(argv=None):
    """Parses the arguments, probes, prints the table and what was written."""
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.probe",
        description="Fit a linear probe (logistic regression) on the output of every "
                    "module (block) of a trained run's trunk; write "
                    "RUN_DIR/probes.json and probes.png.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run directory of kgreedy.train or kgreedy.fit")
    parser.add_argument("--data", default=None, metavar="DATA.json",
                        help="probe on these data: a recipe (its data section and "
                             "seed) or a recipe's data section alone; required for a "
                             "kgreedy.fit run, else replaces the run's recorded data; "
                             "its image shape and classes must be the net's")
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
                           args.seed, data=args.data)
    print_table(result)
    print(f"wrote {RunDir(result['run']).probes} and {RunDir.PROBES_PLOT}")
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

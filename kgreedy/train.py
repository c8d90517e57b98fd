"""`python -m kgreedy.train RECIPE.json [--output DIR] [--set KEY=VALUE ...] [--resume]
[--dry-run] [--memory-budget SIZE]`: parses, loads the recipe and calls `kgreedy.recipe_run.run`, which
checks everything that can be checked cheaply, then trains and exports. Nothing is
written before the recipe is known good, and nothing in --output before this process
holds its run lock (`kgreedy.training.runlock`); a run that fails before training
leaves only what was there before.

Exit status (`kgreedy.cli`): 0 done; 1 an unexpected failure (with its traceback); 2
bad usage, recipe or data, or a run directory in use; 65 a non-finite loss; 69 a lost
worker, 71 out of memory, 74 a full disk (one `kgreedy: error:` line each, saying how
to go on); 75 preempted by SIGTERM after writing a checkpoint (rerun the same command
with --resume).
"""

import argparse
import sys

if __name__ == "__main__":  # first: filters TensorFlow's C++ start-up lines (kgreedy.quiet)
    from kgreedy import quiet
    quiet.install(sys.argv[1:])

from kgreedy import cli, recipe_run
from kgreedy.base.machine import is_budget
from kgreedy.config.recipe import load_recipe


def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.train",
        description="Greedy layer-wise training of a CNN from a JSON recipe.")
    parser.add_argument("recipe", help="recipe JSON file (see docs/recipes.md)")
    parser.add_argument("--output", help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key by dotted path; VALUE is JSON or a "
                             "string (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its last checkpoint")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print per-stage shapes and parameter counts, "
                             "and the memory of each way to train the network")
    parser.add_argument("--memory-budget", type=_budget, metavar="SIZE",
                        help="the memory the run may use, e.g. 12GB, or auto (what the "
                             "device has free): train.memory_budget")
    cli.add_verbose(parser)
    return parser.parse_args(argv)


def _budget(text):
    """--memory-budget's value, checked as the recipe key is."""
    if not is_budget(text):
        raise argparse.ArgumentTypeError(
            f"must be a size such as 12GB or 512MB (B, KB, MB, GB, TB; units of 1024), "
            f"or auto; received {text!r}")
    return text


FLAGS = {"overrides": "--set", "run_dir": "--output", "resume": "--resume"}


def main(argv=None):
    """Parses the arguments and trains; returns the exit status."""
    args = parse_args(argv)
    with cli.flags(**FLAGS):
        overrides = args.set + ([f"train.memory_budget={args.memory_budget}"]
                                if args.memory_budget else [])
        recipe_run.run(load_recipe(args.recipe, overrides), args.output,
                       resume=args.resume, dry_run=args.dry_run)
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

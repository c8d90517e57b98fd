"""`python -m kgreedy.export RUN_DIR [--stage N] [--version V] [--keep-versions N]
[--heads last|ensemble|early_exit]`: exports a trained run as a SavedModel for TF
Serving (`kgreedy.serving.export`) and prints the version directory it wrote. With
`early_exit` it first calibrates the thresholds on the run's evaluation split
(`kgreedy.serving.early_exit.plan_exits`) and says what they give on stderr."""

import sys

if __name__ == "__main__":  # first: filters TensorFlow's C++ start-up lines (kgreedy.quiet)
    from kgreedy import quiet
    quiet.install(sys.argv[1:])

from kgreedy import cli
from kgreedy.base.errors import KgreedyError
from kgreedy.config.recipe import DataConfig
from kgreedy.config.vocabulary import EXPORT_HEADS
from kgreedy.serving.export import export_saved_model
from kgreedy.training import rundir

FLAGS = {"run_dir": "RUN_DIR", "stage": "--stage", "version": "--version",
         "keep_versions": "--keep-versions", "heads": "--heads"}


def main(argv=None):
    """Parses the arguments, exports, prints the path; returns the exit status."""
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.export",
        description="Export a trained run as a SavedModel for TF Serving into "
                    "RUN_DIR/export/MODEL_NAME/VERSION/ and print that path.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run directory of kgreedy.train or kgreedy.fit")
    parser.add_argument("--stage", type=int, default=None,
                        help="export modules 1..N with head N (default: the last "
                             "finished stage)")
    parser.add_argument("--version", type=cli.positive_int, default=None,
                        help="version directory (default: largest existing + 1)")
    parser.add_argument("--keep-versions", type=cli.positive_int, default=None,
                        help="after exporting, delete all but the newest N versions "
                             "(never the one just written; default: keep all)")
    parser.add_argument("--heads", choices=EXPORT_HEADS, default=None,
                        help="serve head N alone, the ensemble of heads 1..N, or heads "
                             "1..N as early exits (default: the recipe's export.heads; "
                             "a kgreedy.fit run: last)")
    cli.add_verbose(parser)
    args = parser.parse_args(argv)
    with cli.flags(**FLAGS):
        recipe, spec, net, stage = rundir.load_trained(args.run_dir, args.stage)
        mode, heads, model_name, max_pixels = _settings(args.run_dir, recipe, net)
        heads = args.heads or heads
        if heads in ("ensemble", "early_exit") and mode == "end_to_end":
            raise KgreedyError("heads", f"{heads!r} needs a greedy or decoupled run: an "
                               "end-to-end run trains only the last head", heads)
        plan = _exit_plan(recipe, spec, net, stage) if heads == "early_exit" else None
        export_root = rundir.RunDir(args.run_dir).export_root(model_name)
        print(export_saved_model(net, spec, export_root, stage, args.version,
                                 keep_versions=args.keep_versions, heads=heads,
                                 max_pixels=max_pixels, exit_plan=plan))
    return cli.EXIT_OK


def _exit_plan(recipe, spec, net, stage):
    """The early-exit thresholds of a `kgreedy.train` run, calibrated on its
    evaluation split as the run's own export would have."""
    if recipe is None:
        raise KgreedyError("heads", "'early_exit' calibrates on a recipe's evaluation "
                           "split, and a kgreedy.fit run has none: export it from Python "
                           "with net.export(path, heads='early_exit', calibration_data=...)",
                           "early_exit")
    from kgreedy import data
    from kgreedy.serving.early_exit import describe_plan, plan_exits

    datasets = data.load(recipe.data, spec, batch_size=recipe.train.batch_size,
                         eval_batch_size=recipe.train.eval_batch_size, seed=recipe.seed)
    try:
        plan = plan_exits(net, datasets.eval, stage,
                          recipe.export.early_exit.max_accuracy_drop)
    finally:
        datasets.close()
    print(f"kgreedy.export: {describe_plan(plan)}", file=sys.stderr)
    return plan


def _settings(run_dir, recipe, net):
    """(mode, default heads, model name, max_pixels) of a run: its recipe's, or for a
    `kgreedy.fit` run (no recipe) its fit.json's mode, the last head, the net's name
    and the recipes' default pixel limit."""
    if recipe is not None:
        return (recipe.train.mode, recipe.export.heads, recipe.model_name,
                recipe.data.max_pixels)
    return (rundir.fit_settings(run_dir)["mode"], "last", net.name,
            DataConfig().max_pixels)


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

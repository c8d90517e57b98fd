"""`python -m kgreedy.export RUN_DIR [--stage N] [--version V] [--keep-versions N]
[--heads last|ensemble]`: exports a trained run as a SavedModel for TF Serving
(`kgreedy.serving.export`) and prints the version directory it wrote."""

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
                        help="serve head N alone, or the ensemble of heads 1..N "
                             "(default: the recipe's export.heads; a kgreedy.fit "
                             "run: last)")
    cli.add_verbose(parser)
    args = parser.parse_args(argv)
    with cli.flags(**FLAGS):
        recipe, spec, net, stage = rundir.load_trained(args.run_dir, args.stage)
        mode, heads, model_name, max_pixels = _settings(args.run_dir, recipe, net)
        heads = args.heads or heads
        if heads == "ensemble" and mode == "end_to_end":
            raise KgreedyError("heads", "'ensemble' needs a greedy run: an end-to-end "
                               "run trains only the last head", heads)
        export_root = rundir.RunDir(args.run_dir).export_root(model_name)
        print(export_saved_model(net, spec, export_root, stage, args.version,
                                 keep_versions=args.keep_versions, heads=heads,
                                 max_pixels=max_pixels))
    return cli.EXIT_OK


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

"""`python -m kgreedy.tune TUNE_RECIPE.json [--output DIR] [--set KEY=VALUE ...]`:
a keras-tuner search over the auxiliary problem (head type, k, width, pool size), the
learning rate and the local objective (`aux.objective` and its weights).

Every trial builds a recipe from its hyperparameters, a `GreedyNet`, and trains its
stages with kgreedy's own `StageLoop` under the recipe's strategy (the one training
loop). Scope `joint`: a trial trains stages 1..N with one design and is scored on
stage N. Scope `per_stage`: stage 1 is searched, its best design and trunk are kept,
then stage 2 is searched on top of that trunk, and so on. Results go to DIR:
`tune_recipe.json`, `tuner/` (keras-tuner projects: rerunning the command resumes
them), `tuning.json` (trials by score) and `best_recipe.json` (a complete train recipe).

Exit status: 0 done; 1 no trial completed, or another failure; 2 bad usage, tune
recipe or data, or an output directory holding another search or in use; 74 a full
disk, 71 out of memory outside a trial (a trial short of memory fails alone): one
`kgreedy: error:` line (`kgreedy.cli`); free space or memory and rerun the command,
which resumes the search.
"""

import sys

if __name__ == "__main__":  # first: filters TensorFlow's C++ start-up lines (kgreedy.quiet)
    from kgreedy import quiet
    quiet.install(sys.argv[1:])

import os
import time

from kgreedy import cli, data
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import write_json
from kgreedy.base.progress import Progress
from kgreedy.config.tune_recipe import check_base, load_tune_recipe
from kgreedy.training import memory, run, session
from kgreedy.tuning.runner import BEST_RECIPE, TUNE_RECIPE, TUNING, AuxTuning
from kgreedy.tuning.search import ConfigError, quiet_trial_tracebacks
from kgreedy.tuning.space import stage_sides

# Keys that may change when a search is resumed: they do not change what a trial is.
RESUMABLE_CHANGES = ("max_trials", "max_consecutive_failed_trials")

# ------------------------------------------------------------------ CLI ------

def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.tune",
        description="keras-tuner search over the auxiliary problem's design.")
    parser.add_argument("tune_recipe", help="tune recipe JSON file (see docs/tuning.md)")
    parser.add_argument("--output", help="output directory (default: runs/<name>); "
                                         "rerunning into it resumes the search")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a tune recipe key by dotted path "
                             "(base.* reaches the base recipe); repeatable")
    cli.add_verbose(parser)
    return parser.parse_args(argv)


FLAGS = {"overrides": "--set", "run_dir": "--output", "resume": "--output"}
# A search resumes by rerunning the command into its directory.
RESUME_HINT = "rerun with the same tune recipe"


def main(argv=None):
    """Parses the arguments and searches; returns the exit status."""
    args = parse_args(argv)
    with cli.flags(**FLAGS):
        return _main(args)


def _main(args):
    tune = load_tune_recipe(args.tune_recipe, args.set)
    base = tune.base
    spec, strategy = session.start(base)
    check_base(tune, spec.image_shape[0], strategy.num_replicas_in_sync)
    # Builds a split model once: a model that cannot be built or split is refused
    # before anything is written.
    sides = stage_sides(base, spec.image_shape, spec.num_classes)
    check_memory(base, spec)
    output = args.output or os.path.join("runs", tune.name)
    _check_output(output, tune)
    progress = Progress()
    # The directory and the lock in one step before anything else touches --output;
    # the checks again under it. A data error then removes only the lock and the
    # directory this process made, if it is still empty.
    with run.locked_run_dir(output, resume=None, record=TUNE_RECIPE,
                            resume_hint=RESUME_HINT, progress=progress) as resuming:
        if resuming:
            _compare(output, tune)
        datasets = data.load(base.data, spec, batch_size=base.train.batch_size,
                             eval_batch_size=base.train.eval_batch_size, seed=base.seed,
                             progress=progress)
        try:
            return _search(tune, datasets, strategy, output, progress, sides)
        finally:
            datasets.close()


def _check_output(output, tune):
    """Refuses, before any work, an output directory in use or holding something
    other than this search (`kgreedy.training.run.check_run_dir`)."""
    if run.check_run_dir(output, resume=None, record=TUNE_RECIPE, resume_hint=RESUME_HINT):
        _compare(output, tune)


def _compare(output, tune):
    run.compare_record(os.path.join(output, TUNE_RECIPE), tune.to_dict(),
                       ignore=RESUMABLE_CHANGES, what="tune recipe",
                       advice=f"only {' and '.join(RESUMABLE_CHANGES)} may change when "
                              "resuming a search; choose another directory")


def check_memory(base, spec):
    """Refuses a base recipe whose largest stage cannot fit in this machine's memory,
    as `kgreedy.train` does, before anything is written. It sizes the base's own
    heads: a trial of wider ones may need more (and fails alone if it runs out)."""
    stages = memory.estimate(base, spec)[1]
    try:
        memory.check(stages, memory.available_for_training()[0])
    except KgreedyError as e:
        raise e.at(f"base.{e.path}") from None


def _search(tune, datasets, strategy, output, progress, sides):
    """Runs the search into `output`, whose run lock the caller holds."""
    quiet_trial_tracebacks()
    # On resume only RESUMABLE_CHANGES can differ: the file shows the latest values.
    write_json(os.path.join(output, TUNE_RECIPE), tune.to_dict())
    start = time.perf_counter()
    try:
        results = AuxTuning(tune, datasets, strategy, output, progress, sides).run()
    except ConfigError as e:
        raise e.error from None
    best = results["best"][-1]
    print(f"done in {time.perf_counter() - start:.0f}s: best {tune.objective} "
          f"{best['score']:.4f}; {os.path.join(output, TUNING)}; train the best design with "
          f"python -m kgreedy.train {os.path.join(output, BEST_RECIPE)}")
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

"""`python -m kgreedy.train RECIPE.json [--output DIR] [--set KEY=VALUE ...] [--resume]
[--dry-run]`: parses, validates everything that can be checked cheaply, and calls
the engine. Nothing is written before the recipe is known good, and nothing in
--output before this process holds its run lock (`kgreedy.training.runlock`); a
run that fails before training leaves only what was there before.

Exit status (`kgreedy.cli`): 0 done; 1 an unexpected failure (with its traceback); 2
bad usage, recipe or data, or a run directory in use; 65 a non-finite loss; 69 a lost
worker, 71 out of memory, 74 a full disk (one `kgreedy: error:` line each, saying how
to go on); 75 preempted by SIGTERM after writing a checkpoint (rerun the same command
with --resume).
"""

import sys

if __name__ == "__main__":  # first: filters TensorFlow's C++ start-up lines (kgreedy.quiet)
    from kgreedy import quiet
    quiet.install(sys.argv[1:])

import contextlib
import os
import shutil
import tempfile

import keras

from kgreedy import cli, data
from kgreedy.model.network import stage_table
from kgreedy.base import faults
from kgreedy.base.files import read_json
from kgreedy.base.machine import available_bytes, format_bytes
from kgreedy.base.progress import Progress
from kgreedy.config.data_checks import check_against_data
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.serving.export import Exporter
from kgreedy.training import distribute, memory, precision, run, session
from kgreedy.training.cache import check_cache_workers
from kgreedy.training.rundir import RunDir


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
                        help="validate and print per-stage shapes and parameter counts")
    cli.add_verbose(parser)
    return parser.parse_args(argv)


def print_dry_run(recipe, spec, net, stages=None, available=None, note=None,
                  unchecked=None):
    """Prints the recipe's stages of `net`; with `stages`
    (`kgreedy.training.memory.estimate`), each stage's memory and what is available
    (None: `unchecked` says why), else `note` (why there is no estimate)."""
    print(f"recipe {recipe.name}: {recipe.train.mode}, {net.num_stages} stages, "
          f"k={recipe.aux.k}, input {'x'.join(map(str, spec.image_shape))}, "
          f"{spec.num_classes} classes")
    for line in stage_table(net):  # the table of the Python API's SplitNet.summary()
        print(line)
    train = recipe.train
    print(net.objective.describe(net.num_stages))
    if train.mode == "decoupled":
        buffer = train.decoupled.buffer_size
        print(f"decoupled: one stage of {train.epochs_per_stage} epochs; all "
              f"{net.num_stages} modules and heads train at once, each with its own "
              "optimizer, no gradient between modules; "
              + (f"module j+1 draws its batches from a replay buffer of module j's last "
                 f"{buffer:,} outputs ({_buffer_mb(net, buffer, train):,.0f} MB in all, "
                 "also in every checkpoint)" if buffer else "no replay buffer"))
    if note:
        print(f"memory: {note}")
    for stage in stages or ():
        print(f"memory: {stage.describe()}")
    if stages:
        worst = memory.largest(stages)
        print(f"memory: largest stage {worst.stage}, "
              f"{format_bytes(worst.total)}; available "
              + ((unchecked or "unknown, not checked") if available is None
                 else format_bytes(available)))


def _buffer_mb(net, size, train):
    """Memory of the replay buffers of `size` outputs, in MB (`memory.replay_buffer_bytes`)."""
    return memory.replay_buffer_bytes(net, train, size) / 2 ** 20


FLAGS = {"overrides": "--set", "run_dir": "--output", "resume": "--resume"}
RESUME_HINT = "pass --resume"


def main(argv=None):
    """Parses the arguments and trains; returns the exit status."""
    args = parse_args(argv)
    with cli.flags(**FLAGS):
        return _main(args)


def _main(args):
    recipe = load_recipe(args.recipe, args.set)
    spec, strategy = session.start(recipe)
    check_against_data(recipe, spec.image_shape[0], strategy.num_replicas_in_sync)
    worker = distribute.WorkerInfo(strategy)
    check_cache_workers(recipe.train, worker.num_workers)
    output = args.output or os.path.join("runs", recipe.name)
    recipe, chose = precision.resolve(
        recipe, _saved_precision(output) if args.resume else None)
    # Sized before anything is allocated, read or written, on the net built without
    # its weights (a split model is loaded and split for real, so that one that
    # cannot be, a crossing split point or a file Keras cannot load, stops the run
    # now). Then the run's net is built, once, seeded, in scope.
    sized, stages, note = memory.estimate(recipe, spec, worker.num_workers)
    available, unchecked = memory.available_for_training()
    if args.dry_run:
        print_dry_run(recipe, spec, sized or run.build_net(recipe, spec, strategy),
                      stages, available, note, unchecked)
        if chose:
            print(chose)
        memory.check(stages, available)
        return cli.EXIT_OK
    memory.check(stages, available)
    del sized
    keras.utils.set_random_seed(recipe.seed)  # the initial weights
    net = run.build_net(recipe, spec, strategy)
    if worker.is_chief:
        run.check_run_dir(output, resume=args.resume, record=RunDir.RECIPE,
                          resume_hint=RESUME_HINT)

    progress = Progress()
    if chose:
        progress.message(chose)
    if not worker.is_chief:
        # TensorFlow's multi-worker pattern: every worker saves (saving can involve
        # collectives), but only the chief into the real run directory.
        scratch = tempfile.mkdtemp(prefix=f"kgreedy-{worker.task.replace(':', '-')}-")
        try:
            with _faults(scratch, output), \
                    _load_data(recipe, spec, scratch, None) as datasets:
                own = RunDir(scratch)
                run.fit_recipe(recipe, datasets, own, strategy, net=net,
                               resume=args.resume, progress=progress, source=RunDir(output),
                               export=_exporter(recipe, datasets.spec, own))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return cli.EXIT_OK
    run_dir = RunDir(output)
    # The directory and the lock come first, in one step, and everything after
    # (the checks again, the disk image cache, training) runs under the lock: a
    # second process is refused before it writes or removes anything in --output.
    with _faults(output, output), \
            run.locked_run_dir(output, resume=args.resume, record=RunDir.RECIPE,
                               resume_hint=RESUME_HINT, progress=progress):
        if args.resume:
            run.compare_record(run_dir.recipe, recipe.to_dict(), what="recipe",
                               normalize=lambda saved: recipe_from_dict(saved).to_dict(),
                               advice="resume with the same recipe and --set values")
        with _load_data(recipe, spec, output, progress) as datasets:
            _, summary = run.fit_recipe(recipe, datasets, run_dir, strategy, net=net,
                                        resume=args.resume, progress=progress,
                                        export=_exporter(recipe, datasets.spec, run_dir))
    final = summary["final"]
    if not summary.get("already_finished"):
        print(f"done: stage {final['stage']} val accuracy {final['val_accuracy']:.4f}; "
              f"summary {run_dir.summary}")
    return cli.EXIT_OK


def _faults(run_dir, output):
    """A lost worker, a full disk or exhausted memory while training: one line naming
    it and how to go on (`kgreedy.base.faults`). `run_dir` is where this process
    writes, `output` the run a resume continues (the chief's)."""
    run = RunDir(output)
    return faults.translated(
        run_dir=run_dir, output_flag="--output", checkpoint=run.newest_checkpoint,
        # --resume needs the recipe.json a run writes first; before it, a rerun starts.
        resume=lambda: "--resume" if os.path.isfile(run.recipe) else None,
        smaller="a smaller train.batch_size or a narrower model (model.blocks[*].width, "
                "aux.width) in a new run (--resume needs the same recipe)",
        available_memory=available_bytes)


def _exporter(recipe, spec, run):
    """The export action of a run (None when the recipe exports nothing)."""
    if not recipe.export.enabled:
        return None
    return Exporter(spec, run.export_root(recipe.model_name), recipe.export.version,
                    recipe.export.keep_versions, recipe.export.heads,
                    max_pixels=recipe.data.max_pixels)


@contextlib.contextmanager
def _load_data(recipe, spec, output, progress):
    """The run's `Datasets`, its disk image cache in `output`/cache/images, closed
    (decoded images freed, disk cache removed) when the run ends. Called under the
    run lock (or in a scratch directory); a data error leaves the cache folders
    only where they hold something this process did not write."""
    cache_dir = os.path.join(output, "cache", "images")
    try:
        datasets = data.load(recipe.data, spec, batch_size=recipe.train.batch_size,
                             eval_batch_size=recipe.train.eval_batch_size,
                             seed=recipe.seed, cache_dir=cache_dir, progress=progress)
    except BaseException:
        _remove_empty_cache(cache_dir)
        raise
    try:
        yield datasets
    finally:
        datasets.close()
        _remove_empty_cache(cache_dir)


def _remove_empty_cache(cache_dir):
    """Removes the image cache's folders that are empty (the stores removed their own
    files); a folder still holding anything stays."""
    for folder in (*(os.path.join(cache_dir, split) for split in ("train", "eval")),
                   cache_dir, os.path.dirname(cache_dir)):
        with contextlib.suppress(OSError):  # absent, or still holding other files
            os.rmdir(folder)


def _saved_precision(output):
    """The precision a run to resume trained in (None where there is no run: the
    checks after this one say so)."""
    path = RunDir(output).recipe
    if not os.path.isfile(path):
        return None
    raw = read_json(path, "--resume")
    train = raw.get("train") if isinstance(raw, dict) else None
    return train.get("mixed_precision") if isinstance(train, dict) else None


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

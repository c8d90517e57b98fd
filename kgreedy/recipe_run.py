"""A recipe's run, from a loaded `Recipe` to its export, in one call: `run`.

`kgreedy.train` parses its arguments, loads the recipe and calls `run`; everything
between is here, in the order it happens:

1. the session (`kgreedy.training.session.start`: devices, determinism, the data's
   shape, the strategy) and the checks that cost nothing: the recipe against the
   data, the feature cache against the workers, the precision (`precision.resolve`);
2. the memory of every stage, sized on the net built without its weights
   (`kgreedy.training.memory.estimate`), against what is available; `dry_run`
   prints it with the stage table and stops here;
3. the run's net, built once, seeded, in the strategy's scope (`run.build_net`);
4. the run directory, read-only (`run.check_run_dir`), then made and locked in one
   step and checked again under the lock (`run.locked_run_dir`), the recipe compared
   with the saved one on resume (`run.compare_record`);
5. the data (`kgreedy.data.load`, its disk image cache in the run directory);
6. training (`run.fit_recipe`: recipe.json for a new run, then `GreedyTrainer`), with
   the export (`kgreedy.serving.export.Exporter`) as the run's last action.

Nothing is written before the recipe is known good, and nothing in the run
directory before this process holds its lock; a run that fails before training
leaves only what was there before. Errors are `KgreedyError`s about the recipe,
`run_dir` and `resume` (the command line names them `--output` and `--resume`) and
the `Stopped` and `Fault` errors of `kgreedy.base.errors`.
"""

import contextlib
import os
import shutil
import tempfile

import keras

from kgreedy import data
from kgreedy.base import faults
from kgreedy.base.files import read_json
from kgreedy.base.machine import available_bytes, format_bytes
from kgreedy.base.progress import Progress
from kgreedy.config.data_checks import check_against_data
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.network import stage_table
from kgreedy.serving.export import Exporter
from kgreedy.training import budget, distribute, memory, precision, session
from kgreedy.training import run as run_path
from kgreedy.training.cache import check_cache_workers
from kgreedy.training.rundir import RunDir

RESUME_HINT = "pass --resume"

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


def run(recipe, output=None, *, resume=False, dry_run=False, progress=None):
    """Trains `recipe` into `output` and exports it (module docstring).

    Args:
        recipe: a loaded, validated `kgreedy.config.recipe.Recipe`.
        output: the run directory (default: runs/<recipe name>).
        resume: continue the run in `output` from its last checkpoint.
        dry_run: print the stages and their memory, check, and stop.
        progress: a `Progress` (default: stdout).

    Returns:
        The run's summary (summary.json's contents, `already_finished` for a resume of
        a finished run), or None for a dry run or a non-chief worker.
    """
    spec, strategy = session.start(recipe)
    worker = distribute.WorkerInfo(strategy)
    check_cache_workers(recipe.train, worker.num_workers)
    output = output or os.path.join("runs", recipe.name)
    saved = _saved_recipe(output) if resume else {}
    recipe, chose = precision.resolve(
        recipe, saved.get("train", {}).get("mixed_precision"))
    # Sized before anything is allocated, read or written, on the net built without
    # its weights (a split model is loaded and split for real, so that one that
    # cannot be, a crossing split point or a file Keras cannot load, stops the run
    # now). Then the run's net is built, once, seeded, in scope.
    limit = budget.resolve_budget(recipe.train)
    recipe, plan = _planned_modules(recipe, spec, limit, worker, saved)
    check_against_data(recipe, spec.image_shape[0], strategy.num_replicas_in_sync)
    sized, stages, note = memory.estimate(recipe, spec, worker.num_workers,
                                          replicas=memory.host_replicas(strategy, worker))
    available, unchecked = memory.available_for_training()
    fits = sized and budget.what_fits(recipe, spec, sized, stages, worker.num_workers,
                                      strategy.num_replicas_in_sync)
    if dry_run:
        net = sized or run_path.build_net(recipe, spec, strategy)
        print_dry_run(recipe, spec, net, stages, available, note, unchecked)
        if sized:
            budget.print_comparison(
                budget.compare_modes(recipe, spec, sized, worker.num_workers),
                recipe.train.batch_size, limit, available)
        for line in (plan, chose):
            if line:
                print(line)
        memory.check(stages, available, limit, fits)
        return None
    memory.check(stages, available, limit, fits)
    del sized
    keras.utils.set_random_seed(recipe.seed)  # the initial weights
    net = run_path.build_net(recipe, spec, strategy)
    if worker.is_chief:
        run_path.check_run_dir(output, resume=resume, record=RunDir.RECIPE,
                               resume_hint=RESUME_HINT)
    progress = progress or Progress()
    for line in (plan, chose):
        if line:
            progress.message(line)
    if not worker.is_chief:
        _train_worker(recipe, spec, strategy, net, output, resume, progress, worker)
        return None
    run_dir = RunDir(output)
    # The directory and the lock come first, in one step, and everything after
    # (the checks again, the disk image cache, training) runs under the lock: a
    # second process is refused before it writes or removes anything in the run
    # directory.
    with _faults(output, output), \
            run_path.locked_run_dir(output, resume=resume, record=RunDir.RECIPE,
                                    resume_hint=RESUME_HINT, progress=progress):
        if resume:
            run_path.compare_record(
                run_dir.recipe, recipe.to_dict(), what="recipe",
                normalize=lambda saved: recipe_from_dict(saved).to_dict(),
                advice="resume with the same recipe and --set values")
        with _load_data(recipe, spec, output, progress) as datasets:
            _, summary = run_path.fit_recipe(
                recipe, datasets, run_dir, strategy, net=net, resume=resume,
                progress=progress, actions=_exporter(recipe, datasets.spec, run_dir))
    final = summary["final"]
    if not summary.get("already_finished"):
        print(f"done: stage {final['stage']} val accuracy {final['val_accuracy']:.4f}; "
              f"summary {run_dir.summary}")
    return summary


def _train_worker(recipe, spec, strategy, net, output, resume, progress, worker):
    """A non-chief worker's run. TensorFlow's multi-worker pattern: every worker saves
    (saving can involve collectives), but only the chief into the real run
    directory; this one writes into a scratch directory and resumes from the
    chief's."""
    scratch = tempfile.mkdtemp(prefix=f"kgreedy-{worker.task.replace(':', '-')}-")
    try:
        with _faults(scratch, output), \
                _load_data(recipe, spec, scratch, None) as datasets:
            own = RunDir(scratch)
            run_path.fit_recipe(recipe, datasets, own, strategy, net=net, resume=resume,
                                progress=progress, source=RunDir(output),
                                actions=_exporter(recipe, datasets.spec, own))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _faults(run_dir, output):
    """A lost worker, a full disk or exhausted memory while training: one line naming
    it and how to go on (`kgreedy.base.faults`). `run_dir` is where this process
    writes, `output` the run a resume continues (the chief's)."""
    chief = RunDir(output)
    return faults.translated(
        run_dir=run_dir, output_flag="--output", checkpoint=chief.newest_checkpoint,
        # --resume needs the recipe.json a run writes first; before it, a rerun starts.
        resume=lambda: "--resume" if os.path.isfile(chief.recipe) else None,
        smaller="a smaller train.batch_size or a narrower model (model.blocks[*].width, "
                "aux.width) in a new run (--resume needs the same recipe)",
        available_memory=available_bytes)


def _exporter(recipe, spec, run_dir):
    """The export action of a run, as a list of actions (none when the recipe exports
    nothing)."""
    if not recipe.export.enabled:
        return []
    return [Exporter(spec, run_dir.export_root(recipe.model_name), recipe.export.version,
                     recipe.export.keep_versions, recipe.export.heads,
                     max_pixels=recipe.data.max_pixels,
                     max_accuracy_drop=recipe.export.early_exit.max_accuracy_drop)]


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


def _saved_recipe(output):
    """The recipe.json of a run to resume, as saved ({} where there is none, or it
    is not a recipe: the checks after this one say so). Its `auto` choices
    (precision, modules) were made when the run started and stay."""
    path = RunDir(output).recipe
    if not os.path.isfile(path):
        return {}
    raw = read_json(path, "--resume")
    if not isinstance(raw, dict):
        return {}
    return {key: value for key, value in raw.items() if isinstance(value, dict)}


def _planned_modules(recipe, spec, limit, worker, saved):
    """(recipe, plan line or None): `model.modules: "auto"` resolved against the
    budget (`budget.choose_modules`), or to what a resumed run chose."""
    if recipe.model.modules != budget.AUTO:
        return recipe, None
    chosen = saved.get("model", {}).get("modules")
    if isinstance(chosen, int) and not isinstance(chosen, bool):
        return recipe_from_dict(budget.with_modules(recipe, chosen).to_dict()), (
            f"memory plan: model.modules 'auto' -> {chosen} modules, as the run chose "
            "when it started")
    return budget.choose_modules(recipe, spec, limit, worker.num_workers)

"""The run directory (docs/DESIGN.md, "Run directory"): its paths, and rebuilding a
trained net from it.

TensorFlow, the data and the model are imported by the functions that restore or
rebuild a net: `RunDir`'s paths also serve `kgreedy.report` and the analysis tools,
which read a run's JSON files and never load TensorFlow.
"""

import os
import sys

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import read_json
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.config.vocabulary import MODES


def _file(name):
    """A `RunDir` property: the absolute path of `name` in the run directory."""
    return property(lambda self: self.path(name), doc=f"RUN_DIR/{name}")


class RunDir:
    """Paths inside one run directory.

    Args:
        root: the directory given as `--output`.
    """

    # The files' names, for readers that name a file as the user gave its folder
    # (the properties below are absolute paths).
    RECIPE = "recipe.json"  # a command-line run's record, written first
    FIT = "fit.json"  # a kgreedy.fit run's record, instead of recipe.json
    NET = "net.json"  # a kgreedy.fit run's untrained net (`GreedyNet.get_config`)
    DATASET = "dataset.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    PROBES = "probes.json"  # kgreedy.probe's figures
    PROBES_PLOT = "probes.png"
    REPORT = "report"  # kgreedy.report's default output directory

    recipe, fit, net, dataset = _file(RECIPE), _file(FIT), _file(NET), _file(DATASET)
    metrics, summary = _file(METRICS), _file(SUMMARY)
    probes, probes_plot, report = _file(PROBES), _file(PROBES_PLOT), _file(REPORT)
    tensorboard = _file("tensorboard")

    def __init__(self, root):
        self.root = os.path.abspath(root)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def checkpoints(self, stage):
        """Checkpoint directory of one stage (`checkpoints/stage{j}`)."""
        return self.path("checkpoints", f"stage{stage}")

    def export_root(self, model_name):
        """TF Serving model base path: versions go below it."""
        return self.path("export", model_name)

    def read_json(self, path):
        """A JSON file of this run (`read_json`, named by its path in the run)."""
        return read_json(path, os.path.relpath(path, self.root))

    def newest_checkpoint(self):
        """The newest checkpoint of the last stage that has one (its prefix), or None:
        what a resume goes on from (or restores before starting the next stage)."""
        from kgreedy.training.checkpoints import checkpoint_paths

        root = self.path("checkpoints")
        stages = sorted((int(name[5:]), name) for name in
                        (os.listdir(root) if os.path.isdir(root) else ())
                        if name.startswith("stage") and name[5:].isdigit())
        for _, name in reversed(stages):
            paths = checkpoint_paths(os.path.join(root, name))
            if paths:
                return paths[-1]
        return None


def stage_checkpoint(net, stage, **training_state):
    """The `tf.train.Checkpoint` of one stage: blocks and heads 1..stage, plus
    `training_state` (optimizer, epoch counter, metric sums) while it trains."""
    import tensorflow as tf

    return tf.train.Checkpoint(**net.checkpoint_objects(stage), **training_state)


def finished_stages(run):
    """The stages a run finished (summary.json), in order; [] before the first."""
    if not os.path.isfile(run.summary):
        return []
    return sorted(entry["stage"] for entry in run.read_json(run.summary).get("stages", []))


def stage_weights(run, stage, num_stages, greedy, finished, warn):
    """The checkpoint to take stage `stage`'s weights from: modules and heads 1..stage.

    Its own newest readable checkpoint (`readable_checkpoint`), unless the newest is
    damaged in a finished stage: then its final weights are gone from its own
    directory, and in a greedy run any later stage's readable checkpoint holds them
    unchanged (modules and heads 1..stage are frozen after the stage), so that one
    is taken. Else the older checkpoint is taken with a warning saying it is not
    what summary.json reports. Reads only: a damaged checkpoint is skipped, never
    moved (`kgreedy.train --resume` moves it, under the run lock).

    Args:
        run: the `RunDir`.
        stage: the stage whose checkpoint directory to search.
        num_stages: the run's stages.
        greedy: whether later stages froze this one's modules (not end to end or
            decoupled, whose one stage is the last).
        finished: the stages summary.json lists as finished.
        warn: called with one line when a damaged checkpoint is skipped.

    Returns:
        A checkpoint prefix.

    Raises:
        KgreedyError: no checkpoint of the stage reads (and no later one holds it).
    """
    from kgreedy.training.checkpoints import describe, readable_checkpoint

    directory = run.checkpoints(stage)
    prefix, damaged = readable_checkpoint(directory)
    if not damaged:
        if prefix is None:
            raise KgreedyError("stage", f"stage {stage} has no checkpoint in {directory}",
                               stage)
        return prefix
    what = f"stage {stage}: {describe(damaged)}"
    if stage in finished and greedy:
        for later in range(stage + 1, num_stages + 1):
            holder, _ = readable_checkpoint(run.checkpoints(later))
            if holder is not None:
                warn(f"{what}; its weights are taken from {holder}, where stage {later} "
                     f"left modules and heads 1..{stage} as stage {stage} finished them")
                return holder
    if prefix is None:
        raise KgreedyError("stage", f"stage {stage} has no readable checkpoint in "
                           f"{directory} ({describe(damaged[::-1])}); rerun kgreedy.train "
                           "with --resume to train it again", stage)
    warn(f"{what}; falling back to {prefix}" + (
        f", which is older than the final weights summary.json reports for stage "
        f"{stage}; rerun kgreedy.train with --resume to train the stage again"
        if stage in finished else ""))
    return prefix


def check_resume(source, stages, finished, net, warn, *, greedy, writable):
    """Before a resume restores anything: the checkpoint each stage goes on from, and
    the first finished stage whose final weights are lost (docs/resume.md, "Damaged
    checkpoints").

    Walks the stages from the last down. A stage's damaged newest checkpoints are
    moved to its `damaged/` (`quarantine`) when `writable`. A finished stage whose
    final checkpoint is damaged stays finished when a later stage's readable
    checkpoint holds its weights (greedy: frozen there), which are then saved into
    its own directory again; otherwise it is trained again from its newest readable
    checkpoint, or from the stage before it.

    Args:
        source: the `RunDir` resumed.
        stages: the stages the run trains, in order.
        finished: the stages summary.json lists as finished.
        net: the trainer's `GreedyNet` (its weights are overwritten by what the
            resume restores afterwards).
        warn: called with one line per stage with a damaged checkpoint.
        greedy: whether later stages froze earlier ones' modules.
        writable: whether this process may move and write checkpoints (it holds
            the run lock, and no other worker reads them now).

    Returns:
        ({stage: prefix or None}, redo): where each stage's weights come from (None:
        its initial weights), and the first finished stage to train again, or None.
    """
    import tensorflow as tf

    from kgreedy.training.checkpoints import (describe, quarantine, readable_checkpoint,
                                              restore, save_checkpoint)

    weights, redo, holder = {}, None, None
    for stage in reversed(stages):
        directory = source.checkpoints(stage)
        prefix, damaged = readable_checkpoint(directory)
        weights[stage] = prefix
        if damaged:
            what = f"stage {stage}: {describe(damaged)}"
            if writable:
                what += f"; moved to {quarantine(directory, damaged)}"
            if stage in finished and holder is not None:
                weights[stage] = holder
                if writable:  # its own directory holds its final weights again
                    checkpoint = stage_checkpoint(net, stage)
                    restore(checkpoint, holder)
                    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
                    what += "; saved again as " + save_checkpoint(
                        manager, int(damaged[0][0].rsplit("-", 1)[1]))
                warn(f"{what}; stage {stage}'s weights are intact in {holder}, where "
                     "the later stage kept them frozen")
                continue
            if stage in finished:
                redo = stage
            start = prefix or (f"stage {stage - 1}'s final weights"
                               if greedy and stage > stages[0] else "its initial weights")
            warn(f"{what}; stage {stage} "
                 + ("is no longer finished and " if stage in finished else "")
                 + f"goes on from {start}; summary.json and metrics.jsonl are rewound "
                 "to it")
        if greedy and holder is None:
            holder = prefix
    return weights, redo


def _warn(text):
    print(f"kgreedy: warning: {text}", file=sys.stderr, flush=True)


def fit_settings(run_dir):
    """A `kgreedy.fit` run's fit.json (its mode, stages and arguments), or None for a
    run of `kgreedy.train` (one with recipe.json, or neither)."""
    run = RunDir(run_dir)
    if os.path.isfile(run.recipe) or not os.path.isfile(run.fit):
        return None
    settings = run.read_json(run.fit)
    mode = settings.get("mode") if isinstance(settings, dict) else None
    if mode not in MODES:
        raise KgreedyError("run_dir", f"{RunDir.FIT} names no mode of {MODES}", mode)
    return settings


def load_trained(run_dir, stage=None, warn=_warn):
    """Rebuilds the net of a stage from a run directory.

    Args:
        run_dir: a run directory written by `kgreedy.train` (rebuilt from its
            recipe), or by `kgreedy.fit` (rebuilt from net.json; fit.json gives the
            mode).
        stage: the stage whose newest checkpoint to restore (default: the last
            finished stage; a stage still training, whose newest checkpoint may be
            mid-epoch, only when asked for by number). In a decoupled run every
            stage comes from the one checkpoint of the last, which holds every
            module and head.
        warn: called with one line when a damaged checkpoint is skipped
            (`stage_weights`); default: `kgreedy: warning: ...` on stderr.

    Returns:
        (recipe, spec, net, stage) with the net's weights restored; `recipe` is None
        for a `kgreedy.fit` run (`fit_settings` reads its fit.json).

    Raises:
        KgreedyError: not a run directory, no finished stage (and none asked for),
            or the stage is out of range or has no readable checkpoint.
    """
    from kgreedy import data
    from kgreedy.model.from_recipe import from_recipe
    from kgreedy.model.network import GreedyNet
    from kgreedy.training.checkpoints import checkpoint_paths, restore

    run = RunDir(run_dir)
    settings = fit_settings(run_dir)
    for needed in ((run.net, run.dataset) if settings else (run.recipe, run.dataset)):
        if not os.path.isfile(needed):
            raise KgreedyError("run_dir", f"not a kgreedy run directory: {needed} is "
                               "missing", run_dir)
    recipe = None if settings else recipe_from_dict(run.read_json(run.recipe))
    spec = data.load_spec(run.dataset)
    if settings:
        net = GreedyNet.from_config(run.read_json(run.net))
        mode, num_stages = settings["mode"], net.num_stages
    else:
        mode, num_stages = recipe.train.mode, recipe.num_stages
    with_checkpoints = [j for j in range(1, num_stages + 1)
                        if checkpoint_paths(run.checkpoints(j))]
    finished = finished_stages(run)
    asked = stage is not None
    if stage is None:
        if not finished:
            raise KgreedyError("run_dir", "has no finished stage yet (stages with "
                               f"checkpoints: {with_checkpoints or 'none'}); pass a "
                               "stage to use an unfinished one", run_dir)
        stage = finished[-1]
    if not 1 <= stage <= num_stages:
        raise KgreedyError("stage", f"must be between 1 and {num_stages}", stage)
    # A decoupled run trains every module and head in its one stage (the last):
    # stage j's model is modules 1..j and head j of that stage's checkpoint.
    source = num_stages if mode == "decoupled" else stage
    try:
        prefix = stage_weights(run, source, num_stages, mode == "greedy", finished, warn)
    except KgreedyError as e:
        if asked:
            raise
        # The stage came from summary.json, not from a flag: name the run.
        raise KgreedyError("run_dir", e.message, run_dir) from None
    if recipe is not None:
        net = from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean, spec.std)
    # The file also holds the optimizer and counters (and, taken from a later stage,
    # more modules), which a trained net does not need; every weight of the net
    # must be found in it, though.
    restore(stage_checkpoint(net, source), prefix)
    return recipe, spec, net, stage

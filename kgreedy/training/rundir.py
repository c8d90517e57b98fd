"""The run directory (docs/DESIGN.md, "Run directory"): its paths, and rebuilding a
trained net from it."""

import os

import tensorflow as tf

from kgreedy import data
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import read_json
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.training.checkpoints import checkpoint_paths


class RunDir:
    """Paths inside one run directory.

    Args:
        root: the directory given as `--output`.
    """

    def __init__(self, root):
        self.root = os.path.abspath(root)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    @property
    def recipe(self):
        return self.path("recipe.json")

    @property
    def dataset(self):
        return self.path("dataset.json")

    @property
    def metrics(self):
        return self.path("metrics.jsonl")

    @property
    def summary(self):
        return self.path("summary.json")

    @property
    def tensorboard(self):
        return self.path("tensorboard")

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
    return tf.train.Checkpoint(**net.checkpoint_objects(stage), **training_state)


def finished_stages(run):
    """The stages a run finished (summary.json), in order; [] before the first."""
    if not os.path.isfile(run.summary):
        return []
    return sorted(entry["stage"] for entry in run.read_json(run.summary).get("stages", []))


def load_trained(run_dir, stage=None):
    """Rebuilds the net of a stage from a run directory.

    Args:
        run_dir: a run directory written by `kgreedy.train`.
        stage: the stage whose newest checkpoint to restore (default: the last
            finished stage; a stage still training, whose newest checkpoint may be
            mid-epoch, only when asked for by number). In a decoupled run every
            stage comes from the one checkpoint of the last, which holds every
            module and head.

    Returns:
        (recipe, spec, net, stage) with the net's weights restored.

    Raises:
        KgreedyError: not a run directory, no finished stage (and none asked for),
            or the stage is out of range or has no checkpoint.
    """
    run = RunDir(run_dir)
    for needed in (run.recipe, run.dataset):
        if not os.path.isfile(needed):
            raise KgreedyError("run_dir", f"not a kgreedy run directory: {needed} is "
                               "missing", run_dir)
    recipe = recipe_from_dict(run.read_json(run.recipe))
    spec = data.load_spec(run.dataset)
    num_stages = recipe.num_stages
    with_checkpoints = [j for j in range(1, num_stages + 1)
                        if tf.train.latest_checkpoint(run.checkpoints(j))]
    if stage is None:
        finished = finished_stages(run)
        if not finished:
            raise KgreedyError("run_dir", "has no finished stage yet (stages with "
                               f"checkpoints: {with_checkpoints or 'none'}); pass a "
                               "stage to use an unfinished one", run_dir)
        stage = finished[-1]
    if not 1 <= stage <= num_stages:
        raise KgreedyError("stage", f"must be between 1 and {num_stages}", stage)
    # A decoupled run trains every module and head in its one stage (the last):
    # stage j's model is modules 1..j and head j of that stage's checkpoint.
    source = num_stages if recipe.train.mode == "decoupled" else stage
    latest = tf.train.latest_checkpoint(run.checkpoints(source))
    if latest is None:
        raise KgreedyError("stage", f"stage {stage} has no checkpoint in "
                           f"{run.checkpoints(source)}; stages with checkpoints: "
                           f"{with_checkpoints}", stage)
    net = from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean, spec.std)
    # The file also holds the optimizer and counters, which a trained net does not
    # need; every weight of the net must be found in it, though.
    stage_checkpoint(net, source).restore(latest).expect_partial() \
        .assert_existing_objects_matched()
    return recipe, spec, net, stage

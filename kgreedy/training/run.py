"""The one run path under every front end: `kgreedy.train`, `kgreedy.tune` and
`kgreedy.fit` prepare, lock and resume a run directory here, and build a recipe's
net and trainer here.

A run goes: check the directory, reading only (`check_run_dir`), before any
expensive work; then take the directory and its lock in one step and check again
under it (`locked_run_dir`), since another process may have written there in
between; compare the run's record with the saved one on resume (`compare_record`),
or write it once the data are known good; then train (`GreedyTrainer`; for a
recipe, `fit_recipe` writes its record and trains). Errors are `KgreedyError`s
about `run_dir` and `resume`; each front end names them as its user typed them
(`--output` and `--resume`, or `run_dir=` and `resume=True`).
"""

import contextlib
import json
import os

import keras

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import read_json, write_json
from kgreedy.model.from_recipe import from_recipe
from kgreedy.training import precision
from kgreedy.training.cache import FeatureCaching
from kgreedy.training.controller import GreedyTrainer
from kgreedy.training.runlock import RunLock, contents


def check_run_dir(path, *, resume, record, resume_hint, locked=False):
    """Checks a run directory; creates nothing. Returns whether the run resumes.

    Args:
        path: the run directory.
        resume: True to continue the run there, False for a new run, None to
            continue it if it holds `record` (a search reruns into its directory).
        record: the file a run writes first and a resume needs (recipe.json).
        resume_hint: how this front end's user resumes ("pass --resume").
        locked: whether this process holds the directory's run lock (then the lock
            file there is its own); before it, a directory in use is refused.

    Raises:
        KgreedyError: about `run_dir` (not a directory, in use, not empty) or
            `resume` (nothing to resume).
    """
    exists = os.path.isdir(path)
    if os.path.exists(path) and not exists:
        raise KgreedyError("run_dir", "exists and is not a directory", path)
    if not locked:
        RunLock(path).check()
    has_record = exists and os.path.isfile(os.path.join(path, record))
    if resume and not has_record:
        raise KgreedyError("resume", f"needs an existing run directory with {record}",
                           path)
    if not contents(path, locked):
        return False
    if resume is None and not has_record:
        raise KgreedyError("run_dir", f"is not empty and holds no {record}; choose a new "
                           "or empty directory", path)
    if resume is False:
        raise KgreedyError("run_dir", f"is not empty; {resume_hint} to continue that run "
                           "or choose another directory", path)
    return True


@contextlib.contextmanager
def locked_run_dir(path, *, resume, record, resume_hint, progress):
    """Makes the run directory and its lock in one step, checks it again under the
    lock (`check_run_dir`), and yields whether the run resumes. Whatever fails in the
    block, the lock goes, and so does the directory if this process made it and it
    is still empty."""
    with RunLock(path, create=True) as lock:
        if lock.warning:
            progress.warning(lock.warning)
        yield check_run_dir(path, resume=resume, record=record, resume_hint=resume_hint,
                            locked=True)


def compare_record(path, settings, *, normalize=None, ignore=(), what="run",
                   advice="resume with the same settings"):
    """Refuses a resume whose settings differ from those saved in `path`.

    Args:
        path: the saved record (recipe.json, fit.json, tune_recipe.json).
        settings: this run's, as a JSON-able dict.
        normalize: makes a saved dict comparable (a recipe loaded with today's
            defaults, so that a run written before a key existed still resumes); it
            may raise `KgreedyError` for a record it cannot read, which then differs.
        ignore: keys that may change on resume.
        what: what the record describes, for the message.
        advice: what the user can do instead, for the message.

    Raises:
        KgreedyError: about `resume`, naming the keys that differ and this run's
            values of them.
    """
    saved = read_json(path, os.path.basename(path))
    if normalize is not None:
        try:
            saved = normalize(saved)
        except KgreedyError:
            pass  # not loadable any more: differs, reported below
    # As JSON gives it back (tuples as lists).
    settings = json.loads(json.dumps(settings))
    saved = saved if isinstance(saved, dict) else {}
    differ = sorted(k for k in set(saved) | set(settings)
                    if k not in ignore and saved.get(k) != settings.get(k))
    if differ:
        raise KgreedyError("resume", f"this {what} differs from the one in {path} in "
                           f"{differ}; {advice}",
                           {k: settings.get(k) for k in differ})


def build_net(recipe, spec, strategy):
    """A recipe's `GreedyNet`, built in `strategy`'s scope with the recipe's precision,
    normalised with `spec`'s statistics (0 and 1 where they are not measured yet).

    Keras' dtype policy is global state: it is set on every build, so one run's
    policy never leaks into the next in the same process.
    """
    keras.mixed_precision.set_global_policy(
        precision.policy_name(recipe.train.mixed_precision))
    channels = spec.image_shape[2]
    with strategy.scope():
        # Statistics not measured yet (read with the data): `recipe_trainer` sets them.
        return from_recipe(recipe, spec.image_shape, spec.num_classes,
                           spec.mean or [0.0] * channels, spec.std or [1.0] * channels)


def recipe_trainer(recipe, datasets, run, strategy, *, net=None, progress=None,
                   actions=(), source=None):
    """The `GreedyTrainer` of a recipe: its net (`net`, built by the caller with
    `build_net`, or built here) on `datasets`, with its `train` config, its feature
    cache (`FeatureCaching`, before `actions`) and seed. Other arguments as
    `GreedyTrainer`'s; the export is one of `actions`."""
    if net is None:
        net = build_net(recipe, datasets.spec, strategy)
    else:  # built before the data were read
        net.set_statistics(datasets.spec.mean, datasets.spec.std)
    return GreedyTrainer(net, datasets, run, strategy, recipe.train, progress=progress,
                         actions=[FeatureCaching(recipe.train), *actions], source=source,
                         seed=recipe.seed)


def fit_recipe(recipe, datasets, run_dir, strategy, *, resume=False, **trainer_args):
    """A recipe's run on ready data: its record (recipe.json, for a new run with a run
    directory), its trainer (`recipe_trainer`, with `trainer_args`) and `fit`.

    Returns:
        (the `GreedyTrainer`, its `fit` summary).
    """
    trainer = recipe_trainer(recipe, datasets, run_dir, strategy, **trainer_args)
    if run_dir is not None and not resume:
        write_json(run_dir.recipe, recipe.to_dict())
    return trainer, trainer.fit(resume=resume)

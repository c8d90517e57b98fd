"""What `kgreedy.fit` does (`kgreedy.api.fit` is the entry point): check the
arguments, prepare the run directory, and run the command line's trainer on a ready
net, the caller's tf.data pipelines and an optimizer factory.

The trainer (`kgreedy.training.controller.GreedyTrainer`) is the one of
`kgreedy.train`: only the data (`kgreedy.data.external.ExternalDatasets`), the
optimizer and the reporting (`kgreedy.training.keras_hooks`: Keras' progress bar,
callbacks and history) differ. A run directory gets the command line's files, with
fit.json (what a resume must match) in place of recipe.json. Before any work, a stage
too short for its BatchNormalization layers' momentum is warned about
(`check_batch_norm`).
"""

import contextlib
import math
import numbers
import os
import warnings

import keras
import tensorflow as tf

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import write_json
from kgreedy.config.recipe import OptimizerConfig, TrainConfig
from kgreedy.config.vocabulary import MODES, ONE_STAGE_MODES
from kgreedy.data.external import ExternalDatasets, check_pipeline
from kgreedy.model.layers import BN_MOMENTUM
from kgreedy.model.network import GreedyNet, parameter_table
from kgreedy.training import budget, run
from kgreedy.training.controller import GreedyTrainer
from kgreedy.training.keras_hooks import KerasCallbacks, ProgbarProgress, StageHistory
from kgreedy.training.rundir import RunDir

RESUME_HINT = "pass resume=True"


def fit_net(net, train_ds, validation_data, *, epochs_per_stage, optimizer, mode,
            steps_per_epoch, callbacks, run_dir, resume, verbose, objective=None,
            memory_budget=None):
    """`kgreedy.api.fit` after its `net` is known to be a `SplitNet` (and `objective`,
    a new `Objective` for it or None, checked)."""
    _check_options(epochs_per_stage, optimizer, mode, steps_per_epoch, callbacks,
                   run_dir, resume, verbose)
    steps = _steps(train_ds, steps_per_epoch, net.image_shape)
    if validation_data is not None:
        if check_pipeline(validation_data, "validation_data",
                          net.image_shape) == tf.data.INFINITE_CARDINALITY:
            raise ValueError("`validation_data` is infinite, so an evaluation would never "
                             "end. Received: validation_data with infinite cardinality")
    train = TrainConfig(mode=mode, epochs_per_stage=epochs_per_stage,
                        batch_size=_batch_size(train_ds), steps_per_epoch=steps,
                        cache_features="off",
                        # The caller's optimizer brings its own decay; this config
                        # only describes the run.
                        optimizer=OptimizerConfig(weight_decay=0.0))
    if memory_budget is not None:
        budget.check_fit(net, train, memory_budget,
                         budget.optimizer_slots(lambda: _optimizer_factory(optimizer)(1)))
    for message in check_batch_norm(net, epochs_per_stage, steps, mode):
        warnings.warn(message, UserWarning, stacklevel=3)  # at the caller of kgreedy.fit
    path = None if run_dir is None else os.fspath(run_dir)
    if path is not None:
        with _keras_errors():
            run.check_run_dir(path, resume=resume, record=RunDir.FIT,
                              resume_hint=RESUME_HINT)
    if objective is not None:  # every argument is known good now
        net.set_objective(objective)
    datasets = ExternalDatasets(train_ds, validation_data, net.spec, steps)
    progress = ProgbarProgress(1 if verbose == "auto" else verbose)
    history = StageHistory()
    one_stage = mode in ONE_STAGE_MODES
    epochs = epochs_per_stage * (1 if one_stage else net.num_stages)
    hooks = KerasCallbacks(
        keras.callbacks.CallbackList([*callbacks, history], verbose=verbose,
                                     epochs=epochs, steps=steps),
        net, epochs_per_stage, one_stage)
    trainer = GreedyTrainer(net, datasets, None if path is None else RunDir(path),
                            tf.distribute.get_strategy(), train, progress=progress,
                            actions=[progress, hooks],
                            optimizer=_optimizer_factory(optimizer))
    try:
        if path is None:
            hooks.train_begin(trainer.stages()[0])
            summary = trainer.fit()
        else:
            # The directory is made and locked in one step, and checked again under
            # the lock: another process may have started a fit there in between.
            with _keras_errors(), run.locked_run_dir(
                    path, resume=resume, record=RunDir.FIT, resume_hint=RESUME_HINT,
                    progress=progress):
                files = RunDir(path)
                if resume:
                    run.compare_record(files.fit, _settings(net, train), what="fit")
                else:
                    write_json(files.fit, _settings(net, train))
                    # What `python -m kgreedy.export RUN_DIR` rebuilds the net from.
                    write_json(files.net, GreedyNet.get_config(net))
                hooks.train_begin(trainer.stages()[0])
                summary = trainer.fit(resume=resume, restore_finished=True)
    except tf.errors.OutOfRangeError:
        raise ValueError(f"`train_ds` ran out of batches before the {steps} steps of an "
                         "epoch; lower steps_per_epoch, or repeat the dataset "
                         f"(train_ds.repeat()). Received: steps_per_epoch={steps}") from None
    hooks.train_end()
    history.summary = summary
    return history


@contextlib.contextmanager
def _keras_errors():
    """The run path's errors about the run directory (`kgreedy.training.run`), in
    Keras' words: a `ValueError` naming the argument and what was received."""
    try:
        yield
    except KgreedyError as e:
        if e.path == "run_dir":
            raise ValueError(f"`run_dir` {e.message}. Received: "
                             f"run_dir={e.received!r}") from None
        if e.path == "resume" and isinstance(e.received, dict):  # settings differ
            raise ValueError(f"{e.message[0].upper()}{e.message[1:]}. Received: "
                             + ", ".join(f"{k}={v!r}" for k, v in e.received.items())
                             ) from None
        if e.path == "resume":
            raise ValueError(f"`resume=True` {e.message}. Received: "
                             f"run_dir={e.received!r}") from None
        raise


def _check_options(epochs_per_stage, optimizer, mode, steps_per_epoch, callbacks,
                   run_dir, resume, verbose):
    for key, value in (("epochs_per_stage", epochs_per_stage),
                       ("steps_per_epoch", steps_per_epoch)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"`{key}` must be a positive integer. Received: "
                             f"{key}={value!r}")
    if epochs_per_stage is None:
        raise ValueError("`epochs_per_stage` must be a positive integer. Received: "
                         "epochs_per_stage=None")
    if optimizer is not None and (not callable(optimizer) or isinstance(optimizer, type)
                                  or isinstance(optimizer, keras.optimizers.Optimizer)):
        raise ValueError("`optimizer` must be a function of the stage returning a new "
                         "optimizer, e.g. lambda stage: keras.optimizers.SGD(0.1, "
                         "momentum=0.9): every stage (decoupled: every module) needs its "
                         "own. Received: "
                         f"optimizer={optimizer!r}")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    bad = [c for c in callbacks if not isinstance(c, keras.callbacks.Callback)]
    if bad or isinstance(callbacks, keras.callbacks.Callback):
        raise ValueError("`callbacks` must be a list of keras.callbacks.Callback. "
                         f"Received: callbacks={callbacks!r}")
    if resume and run_dir is None:
        raise ValueError("`resume=True` continues the fit in `run_dir`; pass run_dir. "
                         "Received: run_dir=None")
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
        raise ValueError(f"`run_dir` must be a path. Received: run_dir={run_dir!r}")
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"`verbose` must be 0, 1, 2 or 'auto'. Received: verbose={verbose!r}")


def _steps(train_ds, steps_per_epoch, image_shape):
    """Batches of one epoch: one pass, or `steps_per_epoch` of it."""
    cardinality = check_pipeline(train_ds, "train_ds", image_shape)
    if cardinality < 0:  # infinite or unknown
        if steps_per_epoch is None:
            kind = "infinite" if cardinality == tf.data.INFINITE_CARDINALITY else "unknown"
            raise ValueError(f"`train_ds` has {kind} length, so an epoch has no end: pass "
                             "steps_per_epoch. Received: steps_per_epoch=None")
        return steps_per_epoch
    if steps_per_epoch is not None and steps_per_epoch > cardinality:
        raise ValueError(f"`train_ds` yields {cardinality} batches per pass, fewer than "
                         "steps_per_epoch; lower it or repeat the dataset "
                         f"(train_ds.repeat()). Received: steps_per_epoch={steps_per_epoch}")
    return steps_per_epoch or cardinality


def _batch_size(train_ds):
    """The batch size (for images/s and the run's record): static, or the first
    batch's."""
    size = train_ds.element_spec[0].shape[0]
    if size is None:
        size = int(tf.shape(next(iter(train_ds))[0])[0])
    return max(int(size), 1)


def _optimizer_factory(optimizer):
    """`optimizer(stage)`, checked to return a Keras optimizer not used before."""
    make = optimizer or (lambda stage: keras.optimizers.SGD(0.1, momentum=0.9))

    def factory(stage):
        made = make(stage)
        if not isinstance(made, keras.optimizers.Optimizer):
            raise ValueError("`optimizer(stage)` must return a Keras optimizer. Received: "
                             f"optimizer({stage})={made!r}")
        if made.built:
            # Its slots belong to another stage's variables.
            raise ValueError("`optimizer(stage)` must return a new optimizer for every "
                             f"stage. Received: optimizer({stage}) returned one already "
                             "used")
        return made

    return factory


def _settings(net, train):
    """What fit.json holds: what a resumed fit must match."""
    return {"format": "kgreedy.fit", "name": net.name,
            "image_shape": list(net.image_shape), "num_classes": net.num_classes,
            "mean": net.mean, "std": net.std,
            "stages": [{**row, "module": module.name, "head": head.name}
                       for row, module, head in zip(parameter_table(net), net.modules,
                                                    net.heads)],
            "mode": train.mode, "epochs_per_stage": train.epochs_per_stage,
            "steps_per_epoch": train.steps_per_epoch, "batch_size": train.batch_size,
            "objective": {"name": net.objective.name, **net.objective.get_config()},
            "pixel_max": net.pixel_max}


def batch_norms(layer):
    """Every `keras.layers.BatchNormalization` in `layer`, nested models and layers
    included."""
    return [sub for sub in layer._flatten_layers(include_self=True, recursive=True)
            if isinstance(sub, keras.layers.BatchNormalization)]


def check_batch_norm(net, epochs_per_stage, steps_per_epoch, mode="greedy"):
    """Warnings for the stages too short for their BatchNormalization momentum.

    A BN layer's moving statistics forget their start by a factor `momentum` per
    step: they settle in about 1/(1 - momentum) steps, 100 for Keras' default 0.99.
    Module j trains only in stage j (in one-stage modes: in the fit's one stage) and
    is frozen after it, so a stage of fewer steps leaves statistics near their start
    for evaluation, the later stages and the export for good (issue 25: 0.29 against
    0.86 accuracy in a README-sized example at 0.99 against 0.9).

    Args:
        net: the `SplitNet`.
        epochs_per_stage: epochs of each stage (one-stage modes: of the fit).
        steps_per_epoch: train steps of one epoch.
        mode: the fit's mode; end to end trains only the last head.

    Returns:
        One message per stage (one-stage modes: per module) with a layer that cannot
        settle: its layers, their momentum, the stage's steps and how to change it.
    """
    steps = epochs_per_stage * steps_per_epoch
    # The largest momentum that settles within the stage, rounded down to 2 digits,
    # and never above kgreedy's own (PyTorch's 0.1).
    advice = min(BN_MOMENTUM, math.floor(100 * (1 - 1 / steps)) / 100)
    messages, last = [], len(net.modules)
    one_stage = mode in ONE_STAGE_MODES
    for j, (module, head) in enumerate(zip(net.modules, net.heads), start=1):
        in_module = _slow(batch_norms(module), steps)
        # End to end trains only the last head.
        in_head = [] if mode == "end_to_end" and j < last else _slow(batch_norms(head),
                                                                     steps)
        if not in_module and not in_head:
            continue
        momentum = max(bn.momentum for bn in in_module + in_head)
        parts = []
        if in_module:
            parts.append(", ".join(repr(bn.name) for bn in in_module[:3])
                         + (f" and {len(in_module) - 3} more" if len(in_module) > 3
                            else "") + f" in module {j}")
        if in_head:
            parts.append(f"{len(in_head)} in head {j}")
        epochs = f"{epochs_per_stage} epoch{'s' * (epochs_per_stage > 1)}"
        messages.append(
            f"kgreedy.fit: {'module' if one_stage else 'stage'} {j} trains {steps} steps"
            f"{' in all' if one_stage else ''} ({epochs} of {steps_per_epoch}), fewer "
            f"than the {_settling(momentum):,.0f} that BatchNormalization momentum "
            f"{momentum:g} needs for its moving statistics to settle (1/(1 - "
            f"momentum)): layers {' and '.join(parts)}. Evaluation"
            f"{'' if one_stage else ', later stages (the module is frozen)'} and the "
            "export would use statistics near their start: pass "
            f"batch_norm_momentum={advice:g} to kgreedy.split, or set those layers' "
            f"momentum to at most {1 - 1 / steps:.3g}.")
    return messages


def _settling(momentum):
    """Steps for BN moving statistics to settle: 1/(1 - momentum) (1 never does)."""
    return math.inf if momentum >= 1 else 1 / (1 - momentum)


def _slow(layers, steps):
    # Rounded: 1/(1 - 0.9) is 10.000000000000002 in floating point.
    return [bn for bn in layers if round(_settling(bn.momentum), 6) > steps]

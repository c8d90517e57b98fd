"""Keras' progress bar, callbacks and `History` on the engine (`kgreedy.fit`).

The engine reports through a `Progress` and `Action`s
(`kgreedy.training.actions`); these classes translate both into what a Keras user
knows from `Model.fit`:

- `ProgbarProgress`: the `Progress` interface drawn with `keras.utils.Progbar`
  (`verbose` 0, 1 or 2 as in `fit`); it is also an action, to open each epoch's bar.
- `KerasCallbacks`: an action that calls `keras.callbacks` hooks with Keras-style
  logs (`loss`, `accuracy`, `val_loss`, `val_accuracy`, `learning_rate`, `stage`,
  `peak_memory_mb`, `gpu_peak_memory_mb`),
  hands each stage's deployed model (its `optimizer` the stage's) to `set_model`, and
  ends a stage early when a callback sets `model.stop_training`.
- `StageHistory`: `keras.callbacks.History` with a per-stage view (`stages`).
"""

import sys

import keras

from kgreedy.base.progress import peak_text
from kgreedy.training.actions import Action

_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def keras_logs(record):
    """An epoch record of the engine in Keras' names; val_* left out when the run
    has no eval data, `gpu_peak_memory_mb` without a GPU (a None breaks callbacks
    that log every value, as Keras' TensorBoard does)."""
    logs = {"loss": record["train_loss"], "accuracy": record["train_accuracy"]}
    if record["val_loss"] is not None:
        logs.update(val_loss=record["val_loss"], val_accuracy=record["val_accuracy"])
    logs.update(learning_rate=record["learning_rate"], stage=record["stage"])
    for key in ("peak_memory_mb", "gpu_peak_memory_mb"):
        if record.get(key) is not None:
            logs[key] = record[key]
    # A decoupled epoch: every module's head, as module{j}_accuracy etc.
    for key in ("train_module_loss", "train_module_accuracy", "val_module_loss",
                "val_module_accuracy"):
        kind, what = key.split("_module_")
        for j, value in enumerate(record.get(key) or (), start=1):
            logs[f"{'val_' if kind == 'val' else ''}module{j}_{what}"] = value
    return logs


class ProgbarProgress(Action):
    """Training progress in Keras' style: a header and a `Progbar` per epoch.

    Args:
        verbose: 0 silent, 1 a live bar per epoch, 2 one line per epoch (as
            `Model.fit`).
    """

    def __init__(self, verbose=1):
        self.verbose = verbose
        self.live = verbose == 1  # `LiveSteps` updates the bar only then
        self.num_stages = None
        self._bar = None
        self._steps = None

    def _print(self, text):
        if self.verbose:
            print(text, flush=True)

    def message(self, text):
        self._print(text)

    def status(self, text):
        del text  # transient lines are the bar's business

    def warning(self, text):
        print(f"kgreedy: warning: {text}", file=sys.stderr, flush=True)

    def stage_start(self, stage, num_stages, row, epochs, steps):
        del epochs
        self.num_stages, self._steps = num_stages, steps
        self._print(f"Stage {stage}/{num_stages}: output "
                    f"{'x'.join(map(str, row['output_shape']))}, "
                    f"{row['trainable_params']:,} trainable and {row['frozen_params']:,} "
                    "frozen parameters")

    def before_epoch(self, driver, epoch):
        """Epoch-driver action: the epoch's header and a new bar."""
        self._print(f"Epoch {epoch}/{driver.epochs} (stage {driver.loop.stage}/"
                    f"{self.num_stages or driver.loop.stage})")
        self._bar = keras.utils.Progbar(driver.steps_per_epoch, verbose=self.verbose,
                                        stateful_metrics=_METRICS)

    def step(self, stage, epoch, epochs, step, steps, loss, accuracy, images_per_second,
             module_accuracies=None):
        del stage, epoch, epochs, steps, images_per_second
        if self.verbose and self._bar is not None:
            modules = [(f"module{j}_accuracy", a)
                       for j, a in enumerate(module_accuracies or (), start=1)]
            self._bar.update(step, [("loss", loss), ("accuracy", accuracy), *modules],
                             finalize=False)

    def epoch_end(self, record, epochs, steps):
        del epochs
        if self.verbose and self._bar is not None:
            logs = keras_logs(record)
            self._bar.update(steps, [(k, logs[k]) for k in _METRICS if k in logs],
                             finalize=True)
        self._bar = None

    def stage_end(self, entry):
        if entry["val_accuracy"] is not None:
            self._print(f"Stage {entry['stage']} done: val_accuracy "
                        f"{entry['val_accuracy']:.4f} in {entry['seconds']:.1f}s"
                        f"{peak_text(entry, ',')}")
        else:
            self._print(f"Stage {entry['stage']} done in {entry['seconds']:.1f}s"
                        f"{peak_text(entry, ',')}")


class StageHistory(keras.callbacks.History):
    """`History` of a greedy fit: `history` holds a list per key over every epoch
    this fit ran (`stage` says which stage each belongs to); `stages[j]` is the
    same for stage j alone; `summary` is the run's summary (summary.json's
    content: per-stage entries and `final`)."""

    def __init__(self):
        super().__init__()
        self.epoch = []
        self.summary = None

    @property
    def stages(self):
        """{stage: {key: [one value per epoch of that stage]}}, stages in order."""
        found = {}
        for i, stage in enumerate(self.history.get("stage", [])):
            view = found.setdefault(stage, {})
            for key, values in self.history.items():
                if key != "stage":
                    view.setdefault(key, []).append(values[i])
        return found


class KerasCallbacks(Action):
    """Epoch-driver action that drives a `keras.callbacks.CallbackList`.

    The epoch index handed to the hooks counts over the whole fit from 0: stage j's
    epoch e (1-based) is (j-1) * epochs + e - 1 in a greedy fit, e - 1 end to end
    or decoupled.
    So epoch numbers go on increasing across stages and survive a resume.

    Args:
        callbacks: a `keras.callbacks.CallbackList` (the user's and the history).
        net: the `GreedyNet` being trained.
        epochs: epochs per stage.
        end_to_end: whether the fit trains one stage with every module (end to end
            or decoupled).
    """

    def __init__(self, callbacks, net, epochs, end_to_end):
        self.callbacks = callbacks
        self.net = net
        self.epochs = epochs
        self.end_to_end = end_to_end
        self.stage = None
        self.model = None
        self.logs = None

    def set_stage(self, stage):
        """Hands stage `stage`'s deployed model (modules 1..stage and its head, the
        net's own layers) to every callback."""
        if stage == self.stage:
            return
        self.stage = stage
        self.model = self.net.deployed_model(stage)
        self.model.stop_training = False
        self.callbacks.set_model(self.model)

    def index(self, stage, epoch):
        return (0 if self.end_to_end else stage - 1) * self.epochs + epoch - 1

    def train_begin(self, first_stage):
        self.set_stage(first_stage)
        self.callbacks.on_train_begin()

    def before_epoch(self, driver, epoch):
        self.set_stage(driver.loop.stage)
        # The stage's optimizer, as `fit` leaves `model.optimizer`: callbacks that
        # change the learning rate (ReduceLROnPlateau) reach it there.
        self.model.optimizer = driver.loop.optimizer
        self.callbacks.on_epoch_begin(self.index(driver.loop.stage, epoch))

    def after_epoch(self, driver, record):
        self.logs = keras_logs(record)
        self.callbacks.on_epoch_end(self.index(record["stage"], record["epoch"]),
                                    dict(self.logs))
        if self.model.stop_training:
            # Keras ends the fit; a greedy fit ends the stage, and the next stage
            # starts with a fresh model handed to set_model.
            driver.stop = True

    def train_end(self):
        self.callbacks.on_train_end(dict(self.logs or {}))

"""The one interface through which work plugs into a run: `Action`.

The controller (`kgreedy.training.controller.GreedyTrainer`) only walks stages and
the epoch driver (`kgreedy.training.driver.EpochDriver`) only runs a stage's
epochs; everything else a run does around them is an action, as orbit's Controller
takes its actions: records and summaries, checkpoints and preemption, progress
lines, Keras callbacks (`kgreedy.fit`), a trial's reports (`kgreedy.tune`), and
tests that look between stages. The hooks, in the order a run calls them:

- `stage_source(trainer, stage)`: before a stage's loop is made, a context manager
  that yields None, or what the stage reads instead of images (the feature cache,
  `kgreedy.training.cache.FeatureCaching`: `train_split` and `eval_split` holding the
  output of modules 1..stage-1); it is left when the stage ends, however it ends;
- `on_stage_start(trainer, stage, driver)`: a stage's loop and driver are made (and
  restored on resume), before its first epoch;
- `before_epoch(driver, epoch)`: before an epoch's first step (also a resumed
  epoch's);
- `after_chunk(driver, epoch, done, images_per_second)`: after every chunk of traced
  steps (`done` steps of the epoch so far);
- `after_epoch(driver, record)`: after an epoch's evaluation, once the driver counts
  the epoch as finished. An action may set `driver.stop` to end the stage there (a
  Keras callback's `model.stop_training`);
- `on_stage_end(trainer, stage, loop)`: the stage's summary entry is written;
- `on_finish(trainer, final)`: every stage is done and the heads are scored; an
  action may fill in `final` (summary.json's `final`, written after this hook) and
  does the run's last work, such as the export (`kgreedy.serving.export.Exporter`,
  which sets `final["export_path"]`). SIGTERM interrupts it at once
  (`kgreedy.training.preemption.Interrupted`) while `trainer.preemption.finishing`
  says what the run is doing, and is too late once that is "";
- `on_run_end(trainer, final)`: every stage is done and scored, every `on_finish` has
  run and summary.json is final.

Every hook does nothing by default (`stage_source` yields None): an action overrides the ones it needs. The
driver and the trainer refuse anything that is not an `Action`, so a misspelt hook
name cannot go unnoticed as it would with duck typing.
"""

import contextlib


class Action:
    """Base class of everything that plugs into a run (module docstring)."""

    def stage_source(self, trainer, stage):
        """A context manager yielding what stage `stage` reads instead of images (an
        object with `train_split` and `eval_split`), or None. At most one action of a
        run yields one."""
        del trainer, stage
        return contextlib.nullcontext()

    def on_stage_start(self, trainer, stage, driver):
        """A stage is about to train its first (or resumed) epoch."""

    def before_epoch(self, driver, epoch):
        """Epoch `epoch` (1-based) of `driver`'s stage is about to start."""

    def after_chunk(self, driver, epoch, done, images_per_second):
        """`done` steps of epoch `epoch` are finished."""

    def after_epoch(self, driver, record):
        """Epoch `record['epoch']` is finished and evaluated; `record` is its record."""

    def on_stage_end(self, trainer, stage, loop):
        """Stage `stage` is finished and in summary.json."""

    def on_finish(self, trainer, final):
        """Every stage is done and scored; fill in `final` before it is written."""

    def on_run_end(self, trainer, final):
        """The run is finished; `final` is summary.json's `final`."""


def check_actions(actions, name="actions"):
    """Returns `actions` as a list, each checked to be an `Action`.

    Raises:
        TypeError: an element is not an `Action`; its hooks would never be called.
    """
    actions = list(actions)
    for action in actions:
        if not isinstance(action, Action):
            raise TypeError(f"`{name}` must hold kgreedy.training.actions.Action "
                            "instances (subclass it and override the hooks you need). "
                            f"Received: {name} holding {action!r}")
    return actions

"""The epoch driver: runs one stage's epochs, for the trainer and the tuner alike.

`EpochDriver` owns what an epoch is: where it starts (from the stage's own step
counter and the count of epochs finished), the train data positioned there, the
steps, the non-finite check, the evaluation and the epoch's record. Everything
else plugs in as an `Action` (`kgreedy.training.actions`: its `before_epoch`,
`after_chunk` and `after_epoch` hooks), as orbit's Controller takes its actions:
the trainer adds checkpoints, preemption, records and progress lines; the tuner
adds its trial's reports; `kgreedy.fit` adds Keras callbacks.
"""

import time

import tensorflow as tf

from kgreedy.training.actions import Action, check_actions


class EpochDriver:
    """Drives a `StageLoop` epoch by epoch.

    Args:
        loop: the stage's `kgreedy.training.stage.StageLoop`.
        datasets: the run's `kgreedy.data.Datasets`.
        epochs: epochs of the stage.
        eval_data: the distributed eval dataset (images, or cached features), or
            None to train without evaluating (the records' val_* are then None).
        train_source: the cached features' train split, or None for images.
        actions: `Action`s, called in order.
        nonfinite: called as `nonfinite(epoch, step_in_epoch)` when a loss was not
            finite; returns the exception to raise.
        align: chunks end at multiples of this many steps (mid-epoch checkpoints).
        peak: a `kgreedy.base.peak_memory.StagePeak` made when the stage began:
            each record then carries its `peak_memory_mb` and `gpu_peak_memory_mb`
            (the peaks since then); None: no memory figures (the tuner's trials).
    """

    def __init__(self, loop, datasets, epochs, eval_data, *, train_source=None,
                 actions=(), nonfinite=None, align=None, peak=None):
        self.loop = loop
        self.datasets = datasets
        self.epochs = epochs
        self.eval_data = eval_data
        self.train_source = train_source
        self.actions = check_actions(actions)
        self.nonfinite = nonfinite or _nonfinite_error
        self.align = align
        self.peak = peak
        self.stop = False
        with loop.strategy.scope():
            # Epochs whose record is out: a checkpoint taken after the last step of an
            # epoch but before its evaluation still evaluates it on resume.
            self.epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False,
                                           name=f"stage{loop.stage}_epoch")

    @property
    def steps_per_epoch(self):
        return self.loop.steps_per_epoch

    def state(self):
        """What a checkpoint of the stage must hold to continue it exactly."""
        return {"epoch": self.epochs_done, **self.loop.state()}

    def position(self):
        """(epoch to run next, its steps already done), from the checkpointed counters."""
        done = int(self.epochs_done.numpy())
        return done + 1, self.loop.step - done * self.steps_per_epoch

    def start_at(self, epoch):
        """Starts a fresh stage at the beginning of `epoch` (a continued trial)."""
        self.epochs_done.assign(epoch - 1)
        self.loop.start_at((epoch - 1) * self.steps_per_epoch)

    def check_finite(self):
        """Raises what `nonfinite` returns if a step's loss was not finite."""
        bad = int(self.loop.first_bad_step.numpy())
        if bad:
            steps = self.steps_per_epoch
            raise self.nonfinite((bad - 1) // steps + 1, (bad - 1) % steps + 1)

    def run(self, last_epoch=None):
        """Runs the epochs from `position()` to `last_epoch` (default: all).

        Returns:
            The last epoch's record, or None when no epoch was left to run.
        """
        loop, record = self.loop, None
        first, start_step = self.position()
        for epoch in range(first, (last_epoch or self.epochs) + 1):
            for action in self.actions:
                action.before_epoch(self, epoch)
            # The epoch's cost as users pay it: this process's CPU seconds (every
            # thread) and wall seconds, training and evaluation together.
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            # The rate at the epoch's first step, also when a resume starts mid-epoch.
            learning_rate = loop.learning_rate_at((epoch - 1) * self.steps_per_epoch)
            train_data = self.datasets.distributed_train(
                loop.strategy, loop.stage, epoch, loop.train, start_step, self.train_source)

            def after_chunk(done, images_per_second, epoch=epoch):
                for action in self.actions:
                    action.after_chunk(self, epoch, done, images_per_second)

            result = loop.train_epoch(train_data, start_step, after_chunk, align=self.align)
            self.check_finite()
            result.update(loop.evaluate(self.eval_data) if self.eval_data is not None
                          else {"val_loss": None, "val_accuracy": None, "val_examples": 0})
            record = {"stage": loop.stage, "epoch": epoch, **result,
                      "learning_rate": learning_rate,
                      "cpu_seconds": time.process_time() - cpu_start,
                      "wall_seconds": time.perf_counter() - wall_start,
                      **(self.peak.read() if self.peak is not None else {})}
            self.epochs_done.assign(epoch)
            for action in self.actions:
                action.after_epoch(self, record)
            start_step = 0
            if self.stop:
                break
        return record


def _nonfinite_error(epoch, step):
    return FloatingPointError(f"epoch {epoch}, step {step}: the loss is not finite")


class LiveSteps(Action):
    """Rewrites the live step line at most twice a second (on a terminal only).

    Reading the metrics syncs with the device and, across workers, is a collective
    every worker must join: with several workers it stays off (`live=False`).

    Args:
        progress: a `kgreedy.base.progress.Progress`.
        live: whether to show the line at all.
        last_epoch: the epoch count the line shows (default: the stage's epochs).
    """

    def __init__(self, progress, live=True, last_epoch=None):
        self.progress = progress
        self.live = live and progress.live
        self.last_epoch = last_epoch
        self.last_shown = 0.0

    def after_chunk(self, driver, epoch, done, images_per_second):
        now = time.perf_counter()
        if self.live and now - self.last_shown >= 0.5:
            loss, acc = driver.loop.metrics()
            modules = driver.loop.module_metrics()
            self.progress.step(driver.loop.stage, epoch, self.last_epoch or driver.epochs,
                               done, driver.steps_per_epoch, loss, acc, images_per_second,
                               None if modules is None else modules[1])
            self.last_shown = now

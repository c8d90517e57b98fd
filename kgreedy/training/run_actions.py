"""The actions every run of the controller has (`kgreedy.training.actions`): each
epoch's record, the stage's checkpoints (and preemption at a step), and the line of
each finished epoch."""

import tensorflow as tf

from kgreedy.base.errors import Preempted
from kgreedy.training.actions import Action
from kgreedy.training.checkpoints import save_checkpoint
from kgreedy.training.rundir import stage_checkpoint


class EpochRecords(Action):
    """Writes each epoch's record (metrics.jsonl, TensorBoard) before its checkpoint:
    a kill in between repeats the epoch, and the resume rewinds the records.

    Args:
        records: the run's `kgreedy.training.records.RunRecords`.
        epochs: epochs per stage (a record's step over the whole run).
    """

    def __init__(self, records, epochs):
        self.records = records
        self.epochs = epochs

    def after_epoch(self, driver, record):
        self.records.epoch(record, (record["stage"] - 1) * self.epochs + record["epoch"])


class StageCheckpoints(Action):
    """Saves stage `stage` at every epoch end, every `every` steps, and when SIGTERM
    arrives (then raises `Preempted`).

    Args:
        net: the `GreedyNet`.
        stage: the stage (its modules, heads and parts 1..stage are saved).
        driver: the stage's `EpochDriver` (its counters are saved too).
        directory: where the last two checkpoints are kept.
        every: steps between mid-epoch checkpoints (0 or None: epoch ends only).
        preemption: the run's `kgreedy.training.preemption.Preemption`.
    """

    def __init__(self, net, stage, driver, directory, every, preemption):
        self.stage = stage
        self.directory = directory
        self.every = every
        self.preemption = preemption
        self.checkpoint = stage_checkpoint(net, stage, **driver.state())
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                  max_to_keep=2)

    def after_chunk(self, driver, epoch, done, images_per_second):
        del images_per_second
        steps = driver.steps_per_epoch
        stop = self.preemption.agreed()
        if stop or (self.every and done % self.every == 0 and done < steps):
            driver.check_finite()
            save_checkpoint(self.manager, driver.loop.step)
        if stop:
            raise Preempted(f"preempted (SIGTERM): checkpoint written at stage "
                            f"{self.stage}, epoch {epoch}, step {done} of {steps} in "
                            f"{self.directory}; rerun with --resume to continue")

    def after_epoch(self, driver, record):
        del record
        save_checkpoint(self.manager, driver.loop.step)


class EpochLines(Action):
    """The line of each finished epoch (`Progress.epoch_end`)."""

    def __init__(self, progress):
        self.progress = progress

    def after_epoch(self, driver, record):
        self.progress.epoch_end(record, driver.epochs, driver.steps_per_epoch)

"""The actions every run of the controller has (`kgreedy.training.actions`): each
epoch's record, the stage's checkpoints (and preemption at a step), the line of
each finished epoch, and the heads' scores at the end."""

import tensorflow as tf

from kgreedy.base.errors import Preempted
from kgreedy.model.ensemble import evaluate_heads
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


class HeadScores(Action):
    """Scores every head and the paper's ensemble (weights 2^j) in one pass through
    the frozen trunk once every stage is done, into summary.json's `final`
    (`ensemble_val_accuracy`, `head_val_accuracies`). An end-to-end run trains the
    last head only, and other workers' summaries are thrown away: both skip it, as
    does a run without evaluation data."""

    def on_finish(self, trainer, final):
        if trainer.train.mode == "end_to_end" or not trainer.worker.is_chief \
                or trainer.eval_data is None:
            return
        trainer.preemption.finishing = "while scoring the heads"
        scores = evaluate_heads(trainer.net, trainer.datasets.eval)
        final["ensemble_val_accuracy"] = scores["ensemble_val_accuracy"]
        final["head_val_accuracies"] = scores["head_val_accuracies"]
        trainer.progress.message(
            f"heads: last {scores['head_val_accuracies'][-1]:.4f}, ensemble of "
            f"{len(scores['head_val_accuracies'])} (weights 2^j) "
            f"{scores['ensemble_val_accuracy']:.4f} on {scores['val_examples']} "
            "eval examples")

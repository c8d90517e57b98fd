"""The outer controller: it walks the stages, and nothing else.

`GreedyTrainer` takes a built net, the run's data and a `TrainConfig`, and trains
every stage not yet done: each stage is a fresh `StageLoop` (`kgreedy.training.
stage`) or `DecoupledLoop`, driven epoch by epoch by an `EpochDriver`
(`kgreedy.training.driver`). Everything around the stages is an `Action`
(`kgreedy.training.actions`): records and checkpoints (`kgreedy.training.
run_actions`, added by the trainer when it has a run directory), progress lines,
Keras callbacks, the heads' scores at the end (`HeadScores`), and whatever the caller
adds: for a recipe's run the feature cache
(`kgreedy.training.cache.FeatureCaching`, a stage's source) and the export
(`kgreedy.serving.export.Exporter`, at the run's finish). Preemption is
`kgreedy.training.preemption`. summary.json (`RunRecords`) stays the controller's:
it is the run's state, the stages done, which a resume reads to know where to go
on, so no action may leave it out. Building the net, the global precision, the run
directory and its lock are the caller's (`kgreedy.training.run`): the command line,
the tuner and `kgreedy.fit` all reach this class through there.
"""

import contextlib
import os
import time

import tensorflow as tf

from kgreedy import data
from kgreedy.base.errors import NonFiniteLoss, Preempted
from kgreedy.base.peak_memory import StagePeak, largest_peaks
from kgreedy.base.progress import Progress
from kgreedy.config.vocabulary import ONE_STAGE_MODES
from kgreedy.model.network import count_params, parameter_table
from kgreedy.training.actions import check_actions
from kgreedy.training.checkpoints import restore
from kgreedy.training.decoupled import DecoupledLoop
from kgreedy.training.distribute import WorkerInfo
from kgreedy.training.driver import EpochDriver, LiveSteps
from kgreedy.training.preemption import Interrupted, Preemption
from kgreedy.training.records import RunRecords
from kgreedy.training.run_actions import (EpochLines, EpochRecords, HeadScores,
                                         StageCheckpoints)
from kgreedy.training.rundir import check_resume, stage_checkpoint, stage_weights
from kgreedy.training.stage import StageLoop


class GreedyTrainer:
    """Trains a net stage by stage (or end to end, or decoupled).

    Checkpoints: `checkpoints/stage{j}` keeps the last two of stage j, written at
    every epoch end, every `train.checkpoint_every_steps` steps and on SIGTERM;
    each holds blocks and heads 1..j, the optimizer (step counter and slots, hence
    the learning-rate position), the epoch counter and the epoch's metric sums.
    With the data order a function of (seed, epoch, step), that is all a resume
    needs to continue exactly where the run stopped.

    Args:
        net: the `GreedyNet` to train, built in `strategy`'s scope.
        datasets: `kgreedy.data.Datasets` (spec with normalisation statistics), or
            an object with its interface (`kgreedy.data.external.ExternalDatasets`).
        run: the `RunDir` to write into; it must exist. None: no run directory
            (records in memory, no checkpoints, no resume, SIGTERM left alone).
        strategy: the `tf.distribute.Strategy` to train under.
        train: the `TrainConfig` (mode, epochs, optimizer, cache, checkpoints).
        progress: a `Progress` (default: stdout).
        actions: more `Action`s, called in this order after the run's own
            (`HeadScores`): the feature cache, the export, Keras callbacks, tests,
            tools.
        source: the `RunDir` to resume from (default: `run`). A non-chief worker
            writes to a temporary directory but resumes from the chief's.
        optimizer: `optimizer(stage)` returns each stage's new Keras optimizer
            (`StageLoop`'s `optimizer`); default: `train.optimizer`'s.
        seed: the run's seed (a decoupled run's replay buffers draw with it).
    """

    def __init__(self, net, datasets, run, strategy, train, *, progress=None,
                 actions=(), source=None, optimizer=None, seed=0):
        self.net = net
        self.datasets = datasets
        self.run = run
        self.strategy = strategy
        self.train = train
        self.progress = progress or Progress()
        # Every run scores its heads first: the export and the caller's actions see
        # the scores in `final`.
        self.actions = [HeadScores(), *check_actions(actions)]
        self.source = source or run
        self.optimizer = optimizer
        self.seed = seed
        self.worker = WorkerInfo(strategy)
        self.preemption = Preemption(strategy, self.worker.num_workers)
        self.table = parameter_table(net)
        self.steps_per_epoch = datasets.stage_steps(train, self.worker.num_workers)
        self.eval_data = datasets.distributed_eval(strategy)
        self._weights = {}  # on resume: each stage's checkpoint (`check_resume`)

    @property
    def end_to_end(self):
        return self.train.mode == "end_to_end"

    @property
    def decoupled(self):
        return self.train.mode == "decoupled"

    def stages(self):
        """Stages to train: 1..J greedily, or only J (every module) end to end or
        decoupled."""
        num = self.net.num_stages
        return [num] if self.train.mode in ONE_STAGE_MODES else list(range(1, num + 1))

    def fit(self, resume=False, *, restore_finished=False):
        """Trains every stage not yet done, then scores the heads and finishes (the
        actions' `on_finish`: the export). Returns the summary dict.

        Args:
            resume: continue the run in `source` from its checkpoints.
            restore_finished: whether the caller goes on using the net
                (`kgreedy.fit`): a resume of a finished run then restores its
                trained weights into it; else it reads nothing (the command line's
                net goes with the process).

        Raises:
            NonFiniteLoss: a loss was NaN/inf; the last good checkpoint is kept.
            Preempted: SIGTERM arrived; a checkpoint of the current step was written
                (after training: scoring and export stopped, nothing half-written).
        """
        if resume and self.run is None:
            raise ValueError("resuming needs a run directory. Received: run=None, "
                             "resume=True")
        if not resume and self.run is not None:
            data.save_spec(self.datasets.spec, self.run.dataset)
        records = RunRecords(self.run, self._existing_summary() if resume else None)
        done = {s for s in records.completed_stages() if s in self.stages()}
        if resume and records.summary.get("final") and done == set(self.stages()):
            # Finished before: scoring and exporting again would only add a version.
            records.close()
            final = records.summary["final"]
            if restore_finished:
                self._restore_stage(final["stage"])
            self.progress.message(
                f"the run in {self.source.root} finished before (stage {final['stage']}, "
                f"val accuracy {final['val_accuracy']:.4f}"
                + (f", exported {final['export_path']}" if final.get("export_path") else "")
                + "); nothing to do")
            return {**records.summary, "already_finished": True}
        if resume:
            self._weights, redo = check_resume(
                self.source, self.stages(), done, self.net, self.progress.warning,
                greedy=self.train.mode == "greedy",
                writable=self.source is self.run and self.worker.num_workers == 1)
            if redo is not None:
                records.unfinish(redo)
                done = {s for s in done if s < redo}
        if self.datasets.info:
            records.summary["data"] = self.datasets.info
        if done:
            self._restore_stage(max(done))
            self.progress.message(f"resuming after stage {max(done)}")
        try:
            with self.preemption.catching(enabled=self.run is not None):
                for stage in self.stages():
                    if stage not in done:
                        self._fit_stage(stage, records, resume)
                final = self._finish_or_stop(records)
        finally:
            records.close()
        for action in self.actions:
            action.on_run_end(self, final)
        return {**records.summary, "final": final}

    # ------------------------------------------------------------ helpers ----

    def _existing_summary(self):
        if os.path.isfile(self.source.summary):
            return self.source.read_json(self.source.summary)
        return None

    def _restore_stage(self, stage):
        prefix = self._weights.get(stage) or stage_weights(
            self.source, stage, self.net.num_stages, self.train.mode == "greedy",
            [stage], self.progress.warning)
        restore(stage_checkpoint(self.net, stage), prefix)

    def _preempted(self, stage, when):
        return Preempted(f"preempted (SIGTERM) {when}: stage {stage}'s checkpoint is in "
                         f"{self.run.checkpoints(stage)}, nothing half-written is kept; "
                         "rerun with --resume to finish")

    def _nonfinite(self, stage):
        def error(epoch, step):
            last = (None if self.run is None
                    else tf.train.latest_checkpoint(self.run.checkpoints(stage)))
            return NonFiniteLoss(
                f"stage {stage}, epoch {epoch}, step {step}: the loss is not finite (NaN "
                f"or inf); stopped without saving; last good checkpoint: "
                f"{last or 'none in this stage'}; lower "
                + ("the optimizer's learning rate" if self.optimizer
                   else "train.optimizer.learning_rate") + " or check the data")
        return error

    # -------------------------------------------------------------- stage ----

    def _fit_stage(self, stage, records, resume):
        if stage > self.stages()[0] and self.preemption.agreed():
            # Between stages: the one before is saved whole and in summary.json.
            raise self._preempted(stage - 1, f"after stage {stage - 1}")
        # The stage's peaks count from here: its source (a feature cache built), its
        # loop and optimizer, then its epochs.
        peak = StagePeak()
        with contextlib.ExitStack() as stack:
            sources = [source for source in (
                stack.enter_context(action.stage_source(self, stage))
                for action in self.actions) if source is not None]
            if len(sources) > 1:
                raise ValueError(f"stage {stage} got {len(sources)} sources from its "
                                 "actions; at most one action may give a stage's source. "
                                 f"Received: sources={sources!r}")
            self._fit_stage_on(stage, records, resume, sources[0] if sources else None,
                               peak)

    def _loop(self, stage, source):
        steps = self.steps_per_epoch
        if self.decoupled:
            return DecoupledLoop(self.net, self.train, self.strategy, steps,
                                 optimizer=self.optimizer, seed=self.seed)
        return StageLoop(self.net, stage, self.train, self.strategy, steps,
                         end_to_end=self.end_to_end, cached_features=source is not None,
                         optimizer=self.optimizer)

    def _fit_stage_on(self, stage, records, resume, source, peak):
        """Stage `stage` on images, or on `source`'s features of modules 1..stage-1;
        `peak`, the `StagePeak` made when it began."""
        epochs, steps = self.train.epochs_per_stage, self.steps_per_epoch
        loop = self._loop(stage, source)
        eval_data = self.eval_data if source is None else \
            self.datasets.distributed_eval(self.strategy, source.eval_split)
        own = [EpochRecords(records, epochs)]
        driver = EpochDriver(
            loop, self.datasets, epochs, eval_data,
            train_source=None if source is None else source.train_split,
            nonfinite=self._nonfinite(stage), align=self.train.checkpoint_every_steps,
            peak=peak)
        checkpoints = None
        if self.run is not None:
            checkpoints = StageCheckpoints(self.net, stage, driver,
                                           self.run.checkpoints(stage),
                                           self.train.checkpoint_every_steps,
                                           self.preemption)
            own.append(checkpoints)
        # Set after the driver exists: the checkpoint action saves the driver's counters.
        driver.actions = check_actions([*own, LiveSteps(self.progress,
                                                        live=self.worker.num_workers == 1),
                                        EpochLines(self.progress), *self.actions])
        if resume:
            restored = self._weights.get(stage)
            if restored:
                restore(checkpoints.checkpoint, restored)
            epoch, step = driver.position()
            # Always: a run killed in the stage's first epoch, before any
            # checkpoint, may have left that epoch's record behind.
            records.rewind(stage, epoch - 1)
            if restored:
                self.progress.message(f"stage {stage}: resuming at epoch {epoch}, step "
                                      f"{step} of {steps}")
        row = self.table[stage - 1]
        if self.train.mode in ONE_STAGE_MODES:
            # Every module trains, with the last head (decoupled: with every head):
            # what the optimizers update (BN moving statistics are in
            # deployed_params, not here).
            row = {**row, "trainable_params": count_params(loop.variables),
                   "frozen_params": 0}
        self.progress.stage_start(stage, self.net.num_stages, row, epochs, steps)
        for action in self.actions:
            action.on_stage_start(self, stage, driver)
        stage_start, stage_cpu = time.perf_counter(), time.process_time()
        record = driver.run()
        if record is None:  # resumed after this stage's last epoch: read its record
            last = [r for r in records.epochs() if r["stage"] == stage]
            record = last[-1] if last else {
                **(loop.evaluate(eval_data) if eval_data is not None
                   else {"val_loss": None, "val_accuracy": None}),
                "train_loss": None, "train_accuracy": None}
        entry = {"stage": stage, "val_accuracy": record["val_accuracy"],
                 "val_loss": record["val_loss"],
                 "train_accuracy": record["train_accuracy"],
                 "train_loss": record["train_loss"],
                 "trainable_params": row["trainable_params"],
                 "frozen_params": row["frozen_params"],
                 "deployed_params": row["deployed_params"],
                 # fewer than epochs when a callback ended the stage early
                 "output_shape": row["output_shape"], "epochs": record.get("epoch", epochs),
                 "seconds": time.perf_counter() - stage_start,
                 # this process's, since the stage (re)started: a resumed stage
                 # counts its last part only, as `seconds` does
                 "cpu_seconds": time.process_time() - stage_cpu,
                 # The largest of its epochs' records (those before a resume were
                 # measured by the process that ran them) and of this process since
                 # the stage (re)started, the checkpoint after the last epoch included.
                 **largest_peaks(peak.read(), *(r for r in records.epochs()
                                                if r["stage"] == stage)),
                 "peak_memory_since": peak.since}
        records.stage(entry)
        self.progress.stage_end(entry)
        for action in self.actions:
            action.on_stage_end(self, stage, loop)

    def _finish(self, records):
        last = records.summary["stages"][-1]
        final = {"stage": last["stage"], "val_accuracy": last["val_accuracy"],
                 "train_accuracy": last["train_accuracy"],
                 "deployed_params": last["deployed_params"],
                 "seconds": sum(e["seconds"] for e in records.summary["stages"]),
                 "cpu_seconds": sum(e.get("cpu_seconds", 0.0)
                                    for e in records.summary["stages"]),
                 "ensemble_val_accuracy": None, "head_val_accuracies": None,
                 "export_heads": None, "export_path": None}
        self.preemption.finishing = "while finishing"
        for action in self.actions:
            action.on_finish(self, final)
        self.preemption.finishing = ""  # too late to stop: summary.json is written next
        records.final(final)
        return final

    def _finish_or_stop(self, records):
        """`_finish`, stopped with `Preempted` by a SIGTERM during the last stage's last
        epoch or during `_finish` itself (scoring, the actions' `on_finish`), which
        leave nothing half-written (the export removes its temporary version)."""
        stage = records.summary["stages"][-1]["stage"]
        self.preemption.finishing = "before scoring the heads and exporting"
        if self.preemption.agreed():
            raise self._preempted(stage, f"after the last stage ({stage}), "
                                  + self.preemption.finishing)
        try:
            return self._finish(records)
        except Interrupted:
            raise self._preempted(stage, f"after the last stage ({stage}), "
                                  + self.preemption.finishing) from None
        finally:
            self.preemption.finishing = None

"""The outer controller: stage order, checkpoints, records, summaries, and the
export action at the end.

`GreedyTrainer` walks the stages of a recipe; each stage is a fresh `StageLoop`
(`kgreedy.training.stage`) driven epoch by epoch by an `EpochDriver`
(`kgreedy.training.driver`), to which the trainer adds its actions: records,
checkpoints and preemption, progress lines. The trainer knows nothing of a specific
dataset (it gets ready-made `Datasets`) nor of the export format (the caller passes
an `export` action). `kgreedy.train` hands it a recipe; `kgreedy.fit` a ready net,
the user's tf.data pipelines and an optimizer factory instead, on the same path.
"""

import os
import shutil
import signal
import threading
import time

import keras
import tensorflow as tf

from kgreedy import data
from kgreedy.base.errors import NonFiniteLoss, Preempted
from kgreedy.base.files import write_json
from kgreedy.base.progress import Progress
from kgreedy.model.ensemble import evaluate_heads
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.network import count_params, parameter_table
from kgreedy.config.vocabulary import ONE_STAGE_MODES
from kgreedy.training.cache import FeatureCache, use_cache
from kgreedy.training import precision
from kgreedy.training.checkpoints import restore, save_checkpoint
from kgreedy.training.decoupled import DecoupledLoop
from kgreedy.training.distribute import WorkerInfo
from kgreedy.training.driver import EpochDriver, LiveSteps
from kgreedy.training.records import RunRecords
from kgreedy.training.rundir import (check_resume, stage_checkpoint, stage_weights,
                                     temporary_versions)
from kgreedy.training.stage import StageLoop


class GreedyTrainer:
    """Trains a recipe stage by stage (or end to end) and exports the result.

    Checkpoints: `checkpoints/stage{j}` keeps the last two of stage j, written at
    every epoch end, every `train.checkpoint_every_steps` steps and on SIGTERM;
    each holds blocks and heads 1..j, the optimizer (step counter and slots, hence
    the learning-rate position), the epoch counter and the epoch's metric sums.
    With the data order a function of (seed, epoch, step), that is all a resume
    needs to continue exactly where the run stopped.

    Args:
        recipe: a validated `Recipe`; or None with `net` and `train` given (then no
            recipe.json is written and no feature cache is used).
        datasets: `kgreedy.data.Datasets` (spec with normalisation statistics), or
            an object with its interface (`kgreedy.data.external.ExternalDatasets`).
        run: the `RunDir` to write into; it must exist. None: no run directory
            (records in memory, no checkpoints, no resume, SIGTERM left alone).
        strategy: the `tf.distribute.Strategy` to train under.
        progress: a `Progress` (default: stdout).
        callbacks: objects with optional `on_stage_end(trainer, stage, loop)`; for
            tests and tools that need to look between stages.
        source: the `RunDir` to resume from (default: `run`). A non-chief worker
            writes to a temporary directory but resumes from the chief's.
        export: called as `export(net, stage)` once every stage is done; returns
            the path it wrote (`kgreedy.serving.export.Exporter`), or None.
        actions: more epoch-driver actions for every stage (tests and tools).
        net: a ready `GreedyNet` to train instead of the recipe's (built in
            `strategy`'s scope); a finished run's resume restores its weights.
        train: the `TrainConfig` to train with (default: the recipe's).
        optimizer: `optimizer(stage)` returns each stage's new Keras optimizer
            (`StageLoop`'s `optimizer`); default: the recipe's.
    """

    def __init__(self, recipe, datasets, run, strategy, progress=None, callbacks=(),
                 source=None, export=None, actions=(), *, net=None, train=None,
                 optimizer=None):
        if recipe is None and (net is None or train is None):
            raise ValueError("GreedyTrainer needs a recipe, or a net and a train "
                             f"config. Received: recipe=None, net={net!r}, train={train!r}")
        self.recipe = recipe
        self.train = train or recipe.train
        self.optimizer = optimizer
        self.datasets = datasets
        self.run = run
        self.source = source or run
        self.strategy = strategy
        self.progress = progress or Progress()
        self.callbacks = list(callbacks)
        self.export = export
        self.actions = list(actions)
        self.worker = WorkerInfo(strategy)
        spec = datasets.spec
        self.given_net = net is not None
        if net is None:
            # Global Keras state: set on every trainer so one run's policy never
            # leaks into the next in the same process. A given net keeps the
            # policy its layers were made with.
            keras.mixed_precision.set_global_policy(
                precision.policy_name(self.train.mixed_precision))
            with strategy.scope():
                net = from_recipe(recipe, spec.image_shape, spec.num_classes,
                                  spec.mean, spec.std)
        self.net = net
        self.table = parameter_table(self.net)
        self.steps_per_epoch = datasets.stage_steps(self.train, self.worker.num_workers)
        self.eval_data = datasets.distributed_eval(strategy)
        self._stop_requested = False
        self._finishing = None  # what `_finish` does now, where SIGTERM interrupts it
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

    def fit(self, resume=False):
        """Trains every stage not yet done, then exports. Returns the summary dict.

        Raises:
            NonFiniteLoss: a loss was NaN/inf; the last good checkpoint is kept.
            Preempted: SIGTERM arrived; a checkpoint of the current step was written
                (after training: scoring and export stopped, nothing half-written).
        """
        if resume and self.run is None:
            raise ValueError("resuming needs a run directory. Received: run=None, "
                             "resume=True")
        if not resume and self.run is not None:
            if self.recipe is not None:
                write_json(self.run.recipe, self.recipe.to_dict())
            data.save_spec(self.datasets.spec, self.run.dataset)
        records = RunRecords(self.run, self._existing_summary() if resume else None)
        done = {s for s in records.completed_stages() if s in self.stages()}
        if resume and records.summary.get("final") and done == set(self.stages()):
            # Finished before: scoring and exporting again would only add a version.
            records.close()
            final = records.summary["final"]
            if self.given_net:  # the caller keeps the net: give it the trained weights
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
        previous_handler = self._catch_sigterm()
        try:
            for stage in self.stages():
                if stage not in done:
                    self._fit_stage(stage, records, resume)
            final = self._finish_or_stop(records)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            records.close()
        return {**records.summary, "final": final}

    # ------------------------------------------------------------ helpers ----

    def _catch_sigterm(self):
        # Python runs signal handlers between bytecodes: while stages train the
        # handler only sets a flag, and the loop checkpoints after the steps in
        # flight. In `_finish` (scoring, export) nothing is left to save and a
        # grace period may be shorter than an export: it interrupts at once.
        # Without a run directory nothing would checkpoint: SIGTERM is left alone.
        if threading.current_thread() is not threading.main_thread() or self.run is None:
            return None

        def handler(signum, frame):
            del signum, frame
            first = not self._stop_requested
            self._stop_requested = True
            if first and self._finishing:
                raise _Interrupted()

        return signal.signal(signal.SIGTERM, handler)

    def _stop_agreed(self):
        """Whether any worker got SIGTERM; every worker must agree on when to stop,
        or the others would wait forever in the next collective."""
        if self.worker.num_workers == 1:
            return self._stop_requested
        flag = tf.constant(1.0 if self._stop_requested else 0.0)
        total = self.strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            self.strategy.run(lambda: flag), axis=None)
        return float(total) > 0

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
        if stage > self.stages()[0] and self._stop_agreed():
            # Between stages: the one before is saved whole and in summary.json.
            raise self._preempted(stage - 1, f"after stage {stage - 1}")
        cache = None
        # Without a recipe the data are the caller's own pipelines, which the cache
        # cannot replay in the engine's seeded order: no cache then.
        if self.recipe is not None and use_cache(self.recipe, self.datasets, stage,
                                                 self.worker.num_workers, self.net):
            cache = FeatureCache(self.net, stage, self.datasets,
                                 self.run.path("cache", f"stage{stage}"),
                                 self.train.cache_memory_mb)
            self.progress.message(f"stage {stage}: {cache.describe()}")
            cache.build()
            self.progress.message(f"stage {stage}: cached in {cache.seconds:.1f}s")
        try:
            self._fit_stage_on(stage, records, resume, cache)
        finally:
            if cache is not None:
                cache.remove()

    def _fit_stage_on(self, stage, records, resume, cache):
        epochs = self.train.epochs_per_stage
        steps = self.steps_per_epoch
        if self.decoupled:
            loop = DecoupledLoop(self.net, self.train, self.strategy, steps,
                                 optimizer=self.optimizer,
                                 seed=self.recipe.seed if self.recipe is not None else 0)
        else:
            loop = StageLoop(self.net, stage, self.train, self.strategy, steps,
                             end_to_end=self.end_to_end, cached_features=cache is not None,
                             optimizer=self.optimizer)
        eval_data = self.eval_data if cache is None else \
            self.datasets.distributed_eval(self.strategy, cache.eval_split)
        every = self.train.checkpoint_every_steps
        checkpoints = _Checkpoints(self, stage) if self.run is not None else None
        driver = EpochDriver(
            loop, self.datasets, epochs, eval_data,
            train_source=None if cache is None else cache.train_split,
            actions=[_Records(records, epochs), *filter(None, [checkpoints]),
                     LiveSteps(self.progress, live=self.worker.num_workers == 1),
                     _EpochLines(self.progress),
                     *self.actions],
            nonfinite=self._nonfinite(stage), align=every)
        if checkpoints is not None:
            checkpoints.attach(driver)
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
                 "cpu_seconds": time.process_time() - stage_cpu}
        records.stage(entry)
        self.progress.stage_end(entry)
        for callback in self.callbacks:
            if hasattr(callback, "on_stage_end"):
                callback.on_stage_end(self, stage, loop)

    def _finish(self, records):
        last = records.summary["stages"][-1]
        final = {"stage": last["stage"], "val_accuracy": last["val_accuracy"],
                 "train_accuracy": last["train_accuracy"],
                 "deployed_params": last["deployed_params"],
                 "seconds": sum(e["seconds"] for e in records.summary["stages"]),
                 "cpu_seconds": sum(e.get("cpu_seconds", 0.0)
                                    for e in records.summary["stages"]),
                 "ensemble_val_accuracy": None, "head_val_accuracies": None,
                 "export_heads": (self.recipe.export.heads if self.recipe is not None
                                  else getattr(self.export, "heads", None)),
                 "export_path": None}
        if not self.end_to_end and self.worker.is_chief and self.eval_data is not None:
            self._finishing = "while scoring the heads"
            # One pass through the frozen trunk scores every head and the paper's
            # ensemble (an end-to-end run trains the last head only). Other workers'
            # summaries are thrown away, so they skip it.
            scores = evaluate_heads(self.net, self.datasets.eval)
            final["ensemble_val_accuracy"] = scores["ensemble_val_accuracy"]
            final["head_val_accuracies"] = scores["head_val_accuracies"]
            self.progress.message(
                f"heads: last {scores['head_val_accuracies'][-1]:.4f}, ensemble of "
                f"{len(scores['head_val_accuracies'])} (weights 2^j) "
                f"{scores['ensemble_val_accuracy']:.4f} on {scores['val_examples']} "
                "eval examples")
        if self.export is not None:
            self._finishing = "while exporting"
            final["export_path"] = self.export(self.net, last["stage"])
        self._finishing = ""  # too late to stop: the version is whole and in place
        if final["export_path"]:
            self.progress.message(f"exported {final['export_path']}")
        records.final(final)
        return final

    def _finish_or_stop(self, records):
        """`_finish`, stopped with `Preempted` by a SIGTERM during the last stage's last
        epoch or during `_finish` itself (scoring, export), leaving no half version."""
        stage = records.summary["stages"][-1]["stage"]
        self._finishing = "before scoring the heads and exporting"
        if self._stop_agreed():
            raise self._preempted(stage, f"after the last stage ({stage}), "
                                  + self._finishing)
        root = getattr(self.export, "export_root", None)
        before = temporary_versions(root)
        try:
            return self._finish(records)
        except _Interrupted:
            # The exporter removes its temporary version itself, unless the signal
            # came between its creation and the exporter's `try`.
            for path in temporary_versions(root) - before:
                shutil.rmtree(path, ignore_errors=True)
            raise self._preempted(stage, f"after the last stage ({stage}), "
                                  + self._finishing) from None
        finally:
            self._finishing = None


class _Interrupted(BaseException):
    """SIGTERM in `_finish`, raised by the handler (not an `Exception`: no `except
    Exception` of Keras or TensorFlow holds it up); `_finish_or_stop` stops then."""


# ------------------------------------------------------------ actions ----

class _Records:
    """Writes each epoch's record (metrics.jsonl, TensorBoard) before its checkpoint:
    a kill in between repeats the epoch, and the resume rewinds the records."""

    def __init__(self, records, epochs):
        self.records = records
        self.epochs = epochs

    def after_epoch(self, driver, record):
        self.records.epoch(record, (record["stage"] - 1) * self.epochs + record["epoch"])


class _Checkpoints:
    """Saves the stage at every epoch end, every `train.checkpoint_every_steps` steps,
    and when SIGTERM arrives (then raises `Preempted`)."""

    def __init__(self, trainer, stage):
        self.trainer = trainer
        self.stage = stage
        self.every = trainer.train.checkpoint_every_steps
        self.checkpoint = self.manager = None

    def attach(self, driver):
        trainer = self.trainer
        self.checkpoint = stage_checkpoint(trainer.net, self.stage, **driver.state())
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, trainer.run.checkpoints(self.stage), max_to_keep=2)

    def after_chunk(self, driver, epoch, done, images_per_second):
        del images_per_second
        steps = driver.steps_per_epoch
        stop = self.trainer._stop_agreed()
        if stop or (self.every and done % self.every == 0 and done < steps):
            driver.check_finite()
            save_checkpoint(self.manager, driver.loop.step)
        if stop:
            raise Preempted(f"preempted (SIGTERM): checkpoint written at stage "
                            f"{self.stage}, epoch {epoch}, step {done} of {steps} in "
                            f"{self.trainer.run.checkpoints(self.stage)}; rerun with "
                            "--resume to continue")

    def after_epoch(self, driver, record):
        del record
        save_checkpoint(self.manager, driver.loop.step)


class _EpochLines:
    """The line of each finished epoch."""

    def __init__(self, progress):
        self.progress = progress

    def after_epoch(self, driver, record):
        self.progress.epoch_end(record, driver.epochs, driver.steps_per_epoch)

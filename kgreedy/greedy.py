"""The outer controller: stage order, evaluation, checkpoints, summaries and export.

`GreedyTrainer` walks the stages of a recipe; each stage is trained by a fresh
`StageLoop` (kgreedy.stage). The trainer knows nothing of a specific dataset: it
gets ready-made `Datasets`.
"""

import os
import time

import tensorflow as tf

from kgreedy import data, export
from kgreedy.files import write_json
from kgreedy.network import GreedyNet, parameter_table
from kgreedy.progress import Progress
from kgreedy.records import RunRecords
from kgreedy.rundir import stage_checkpoint
from kgreedy.stage import StageLoop


class GreedyTrainer:
    """Trains a recipe stage by stage (or end to end) and exports the result.

    Args:
        recipe: a validated `Recipe`.
        datasets: `kgreedy.data.Datasets` (spec with normalisation statistics).
        run: the `RunDir` to write into; it must exist.
        strategy: the `tf.distribute.Strategy` to train under.
        progress: a `Progress` (default: stdout).
        callbacks: objects with optional `on_stage_end(trainer, stage, loop)`; for
            tests and tools that need to look between stages.
    """

    def __init__(self, recipe, datasets, run, strategy, progress=None, callbacks=()):
        self.recipe = recipe
        self.datasets = datasets
        self.run = run
        self.strategy = strategy
        self.progress = progress or Progress()
        self.callbacks = list(callbacks)
        spec = datasets.spec
        with strategy.scope():
            self.net = GreedyNet(recipe, spec.image_shape, spec.num_classes,
                                 spec.mean, spec.std)
        self.table = parameter_table(self.net)
        steps = datasets.steps_per_epoch
        if recipe.train.steps_per_epoch:
            steps = min(steps, recipe.train.steps_per_epoch)
        self.steps_per_epoch = steps
        self.train_data = strategy.experimental_distribute_dataset(datasets.train)
        self.eval_data = strategy.experimental_distribute_dataset(datasets.eval)

    @property
    def end_to_end(self):
        return self.recipe.train.mode == "end_to_end"

    def stages(self):
        """Stages to train: 1..J greedily, or only J (every block) end to end."""
        num = self.net.num_stages
        return [num] if self.end_to_end else list(range(1, num + 1))

    def fit(self, resume=False):
        """Trains every stage not yet done, then exports. Returns the summary dict."""
        if not resume:
            write_json(self.run.recipe, self.recipe.to_dict())
            data.save_spec(self.datasets.spec, self.run.dataset)
        records = RunRecords(self.run, self._existing_summary() if resume else None)
        done = [s for s in records.completed_stages() if s in self.stages()]
        if done:
            self._restore_stage(done[-1])
            self.progress.message(f"resuming after stage {done[-1]}")
        try:
            for stage in self.stages():
                if stage not in done:
                    self._fit_stage(stage, records, resume)
            final = self._finish(records)
        finally:
            records.close()
        return {**records.summary, "final": final}

    def _existing_summary(self):
        if os.path.isfile(self.run.summary):
            return self.run.read_json(self.run.summary)
        return None

    def _restore_stage(self, stage):
        latest = tf.train.latest_checkpoint(self.run.checkpoints(stage))
        stage_checkpoint(self.net, stage).restore(latest).expect_partial()

    def _fit_stage(self, stage, records, resume):
        epochs = self.recipe.train.epochs_per_stage
        loop = StageLoop(self.net, stage, self.recipe.train, self.strategy,
                         self.steps_per_epoch, end_to_end=self.end_to_end)
        with self.strategy.scope():
            epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = stage_checkpoint(self.net, stage, loop.optimizer, epoch_var)
        manager = tf.train.CheckpointManager(checkpoint, self.run.checkpoints(stage),
                                             max_to_keep=2)
        if resume and manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint)
            self.progress.message(f"stage {stage}: resuming after epoch {int(epoch_var)}")
        row = self.table[stage - 1]
        if self.end_to_end:
            row = {**row, "trainable_params": row["deployed_params"], "frozen_params": 0}
        self.progress.stage_start(stage, self.net.num_stages, row, epochs,
                                  self.steps_per_epoch)
        stage_start = time.perf_counter()
        record = None
        for epoch in range(int(epoch_var) + 1, epochs + 1):
            learning_rate = loop.learning_rate

            def show(step, loss, acc, ips, epoch=epoch):
                self.progress.step(stage, epoch, epochs, step, self.steps_per_epoch,
                                   loss, acc, ips)

            result = loop.train_epoch(self.train_data, on_progress=show)
            result.update(loop.evaluate(self.eval_data))
            record = {"stage": stage, "epoch": epoch, **result,
                      "learning_rate": learning_rate}
            global_epoch = (stage - 1) * epochs + epoch
            records.epoch(record, global_epoch)
            epoch_var.assign(epoch)
            manager.save(checkpoint_number=epoch)
            self.progress.epoch_end(record, epochs, self.steps_per_epoch)
        if record is None:  # resumed after the last epoch of this stage
            record = {**loop.evaluate(self.eval_data), "train_loss": None,
                      "train_accuracy": None}
        entry = {"stage": stage, "val_accuracy": record["val_accuracy"],
                 "val_loss": record["val_loss"],
                 "train_accuracy": record["train_accuracy"],
                 "train_loss": record["train_loss"],
                 "trainable_params": row["trainable_params"],
                 "frozen_params": row["frozen_params"],
                 "deployed_params": row["deployed_params"],
                 "output_shape": row["output_shape"], "epochs": epochs,
                 "seconds": time.perf_counter() - stage_start}
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
                 "export_path": None}
        if self.recipe.export.enabled:
            path = export.export_saved_model(
                self.net, self.datasets.spec, self.run.export_root(self.recipe.model_name),
                stage=last["stage"], version=self.recipe.export.version)
            final["export_path"] = path
            self.progress.message(f"exported {path}")
        records.final(final)
        return final

"""What a run leaves behind: metrics.jsonl, TensorBoard scalars, summary.json."""

import json
import os

import tensorflow as tf

from kgreedy.base.files import append_jsonl, write_json, write_text

_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
            "learning_rate", "images_per_second", "peak_memory_mb",
            "gpu_peak_memory_mb")
# Per-module lists of a decoupled run: TensorBoard's `module{j}/{train,val}_{...}`.
_MODULE_LISTS = ("train_module_loss", "train_module_accuracy", "val_module_loss",
                 "val_module_accuracy")


class RunRecords:
    """Writes the run's metrics, TensorBoard events and summary.

    metrics.jsonl gets one object per epoch; TensorBoard gets the same scalars under
    `stage{j}/...` (step: epoch within the stage) and `all/...` (step: epochs since
    the start of the run), and a decoupled run's per-module figures under
    `module{j}/...`; summary.json is rewritten atomically after every stage.

    With `run` None (`kgreedy.fit` without a run directory) the records stay in
    memory and nothing is written.

    Args:
        run: a `RunDir`, or None.
        summary: an existing summary to extend (on resume), or None.
    """

    def __init__(self, run, summary=None):
        self.run = run
        self.summary = summary or {"stages": [], "final": None}
        self._writer = None
        self._kept = []  # the epoch records when there is no run directory

    @property
    def writer(self):
        if self._writer is None:
            os.makedirs(self.run.tensorboard, exist_ok=True)
            self._writer = tf.summary.create_file_writer(self.run.tensorboard)
        return self._writer

    def epoch(self, record, global_epoch):
        if self.run is None:
            self._kept.append(record)
            return
        append_jsonl(self.run.metrics, record)
        with self.writer.as_default():
            # val_* are None in a run without eval data (kgreedy.fit), the GPU's
            # peak without a GPU: no point then.
            for key in (k for k in _SCALARS if record.get(k) is not None):
                tf.summary.scalar(f"stage{record['stage']}/{key}", record[key],
                                  step=record["epoch"])
                tf.summary.scalar(f"all/{key}", record[key], step=global_epoch)
            for key in (k for k in _MODULE_LISTS if record.get(k) is not None):
                kind, what = key.split("_module_")
                for j, value in enumerate(record[key], start=1):
                    tf.summary.scalar(f"module{j}/{kind}_{what}", value,
                                      step=record["epoch"])
        self.writer.flush()

    def epochs(self):
        """The epoch records in metrics.jsonl, in order."""
        if self.run is None:
            return list(self._kept)
        if not os.path.isfile(self.run.metrics):
            return []
        with open(self.run.metrics, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def rewind(self, stage, epoch):
        """Drops epoch records after (stage, epoch): the checkpoint a run resumes from.

        A run killed between writing an epoch's record and its checkpoint repeats
        that epoch; without this its record would appear twice.
        """
        kept = [r for r in self.epochs() if (r["stage"], r["epoch"]) <= (stage, epoch)]
        if self.run is None:
            self._kept = kept
        elif os.path.isfile(self.run.metrics):
            write_text(self.run.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def unfinish(self, stage):
        """Drops `stage` and the stages after it from summary.json, and the final
        figures: their weights are gone (a damaged final checkpoint), so they train
        again. The epoch records are rewound when the stage resumes (`rewind`)."""
        self.summary["stages"] = [e for e in self.summary["stages"] if e["stage"] < stage]
        self.final(None)

    def completed_stages(self):
        return [entry["stage"] for entry in self.summary["stages"]]

    def stage(self, entry):
        self.summary["stages"] = [e for e in self.summary["stages"]
                                  if e["stage"] != entry["stage"]] + [entry]
        if self.run is not None:
            write_json(self.run.summary, self.summary)

    def final(self, final):
        self.summary["final"] = final
        if self.run is not None:
            write_json(self.run.summary, self.summary)

    def close(self):
        if self._writer is not None:
            self._writer.close()

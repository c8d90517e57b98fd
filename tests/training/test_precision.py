"""train.mixed_precision and train.jit_compile: each trains, and the export stays float32."""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy import data
from kgreedy.base.progress import Progress
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.serving.export import Exporter
from kgreedy.training.run import recipe_trainer
from kgreedy.training.rundir import RunDir


@pytest.mark.slow
@pytest.mark.parametrize("train", [
    {"mixed_precision": "mixed_bfloat16"},
    {"mixed_precision": "mixed_float16"},
    {"jit_compile": True, "mixed_precision": "none"},
], ids=["bfloat16", "float16", "xla"])
def test_precision_and_compilation_variants_train_and_export(tmp_path, train):
    r = recipe_from_dict({
        "name": "prec",
        "model": {"blocks": [{"width": 8}, {"width": 16, "downsample": "psi"}]},
        "aux": {"k": 2, "width": 8},
        "train": {"epochs_per_stage": 3, "batch_size": 32, "steps_per_epoch": 10,
                  "optimizer": {"learning_rate": 0.05}, **train},
    })
    datasets = data.load(r.data, data.describe(r.data), batch_size=32, seed=0)
    os.makedirs(tmp_path / "run")
    try:
        run = RunDir(tmp_path / "run")
        trainer = recipe_trainer(r, datasets, run, tf.distribute.get_strategy(),
                                 progress=Progress(io.StringIO(), live=False),
                                 actions=[Exporter(datasets.spec, run.export_root("prec"))])
        compute = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(
            train.get("mixed_precision"), "float32")
        assert trainer.net.modules[0].conv.compute_dtype == compute
        assert trainer.net.modules[0].conv.kernel.dtype == "float32"  # variables stay float32
        summary = trainer.fit()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert summary["final"]["val_accuracy"] > 0.5  # it learned (10 classes: chance 0.1)
    model = tf.saved_model.load(summary["final"]["export_path"])
    images = tf.constant(np.random.default_rng(0).uniform(0, 16, (4, 8, 8, 1)), tf.float32)
    probabilities = model.signatures["serving_default"](images=images)["probabilities"]
    assert probabilities.dtype == tf.float32
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-3)

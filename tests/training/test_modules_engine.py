"""The engine on a model split into modules: two replicas train what one does, the
feature cache gives what recomputing gives, a resumed run ends where an unbroken
one does, and checkpoints restore every module's weights.

The model is a user's small residual network with synchronised BatchNormalization,
saved as a .keras file, on the embedded 8x8 digits, split into two modules of balanced
depth, with its own classifier as the last head. (The named ResNets train in
tests/tuning/test_tune_modules.py and the README's commands; small, the engine tests
stay fast.)
"""

import io
import os
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy import data
from kgreedy.base.progress import Progress
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.training.controller import GreedyTrainer
from kgreedy.training.rundir import RunDir, load_trained


MODEL = Path(tempfile.mkdtemp(prefix="kgreedy-modules-")) / "small_resnet.keras"


def small_resnet():
    """stem conv-BN-ReLU, two residual conv-BN blocks, global pool, linear: 8 x 8 x 1
    digits to 10 logits. BN is synchronised, so two replicas train as one."""
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    h = keras.layers.ReLU(name="stem_relu")(
        keras.layers.BatchNormalization(synchronized=True, name="stem_bn")(h))
    for block in ("res1", "res2", "res3"):
        r = keras.layers.Conv2D(8, 3, padding="same", use_bias=False,
                                name=f"{block}_conv")(h)
        r = keras.layers.BatchNormalization(synchronized=True, name=f"{block}_bn")(r)
        h = keras.layers.ReLU(name=f"{block}_out")(keras.layers.Add()([h, r]))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="predictions")(x),
                       name="small_resnet")


def recipe(**overrides):
    if not MODEL.is_file():
        small_resnet().save(MODEL)
    raw = {
        "name": "modules",
        "seed": 3,
        "model": {"keras_file": str(MODEL), "modules": 2, "sync_batch_norm": True},
        "aux": {"k": 2, "last_head": "model"},
        "train": {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 3,
                  "steps_per_execution": 1, "deterministic": True,
                  "optimizer": {"name": "sgd", "learning_rate": 0.05}},
        "export": {"enabled": False},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return recipe_from_dict(raw)


class Weights:
    """Every weight of the net after each stage, by path."""

    def __init__(self, stop_after=None):
        self.values = {}
        self.stop_after = stop_after

    def on_stage_end(self, trainer, stage, loop):
        net = trainer.net
        self.values[stage] = {w.path: np.array(w.numpy())
                              for layer in net.modules + net.heads for w in layer.weights}
        if stage == self.stop_after:
            raise KeyboardInterrupt("stopped after stage 1")


def fit(r, run_dir, strategy=None, callbacks=(), resume=False):
    keras.utils.set_random_seed(r.seed)
    datasets = data.load(r.data, data.describe(r.data), batch_size=r.train.batch_size,
                         seed=r.seed)
    os.makedirs(run_dir, exist_ok=True)
    try:
        return GreedyTrainer(r, datasets, RunDir(run_dir),
                             strategy or tf.distribute.get_strategy(),
                             progress=Progress(io.StringIO(), live=False),
                             callbacks=callbacks).fit(resume=resume)
    finally:
        datasets.close()


def assert_same(one, two, atol):
    assert one.keys() == two.keys()
    for path, value in one.items():
        np.testing.assert_allclose(two[path], value, rtol=0, atol=atol, err_msg=path)


def test_the_split_net_has_two_modules_and_the_model_s_classifier():
    r = recipe()
    assert r.num_stages == 2 and r.split
    spec = data.describe(r.data)
    from kgreedy.model.from_recipe import from_recipe
    net = from_recipe(r, spec.image_shape, spec.num_classes, [0.0], [1.0])
    assert [m.name for m in net.modules] == ["stage1_module", "stage2_module"]
    # The last head is the model's own global pool and linear layer: 8 x 10 + 10.
    assert sum(int(np.prod(w.shape)) for w in net.heads[-1].trainable_weights) == 90
    layers = [layer.name for m in net.modules for layer in m.layers]
    assert {"stem", "res3_out"} <= set(layers)


@pytest.mark.slow
def test_resume_after_stage_one_ends_where_an_unbroken_run_does(tmp_path):
    unbroken = Weights()
    fit(recipe(), tmp_path / "unbroken", callbacks=[unbroken])
    stopped = Weights(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        fit(recipe(), tmp_path / "broken", callbacks=[stopped])
    resumed = Weights()
    summary = fit(recipe(), tmp_path / "broken", callbacks=[resumed], resume=True)
    assert summary["final"]["stage"] == 2
    assert_same(unbroken.values[2], resumed.values[2], atol=0)
    # The tools restore every module and head from the run directory.
    _, _, net, stage = load_trained(str(tmp_path / "broken"))
    restored = {w.path: w.numpy() for layer in net.modules + net.heads
                for w in layer.weights}
    assert stage == 2
    assert_same(unbroken.values[2], restored, atol=0)


@pytest.mark.slow
def test_the_feature_cache_trains_a_module_as_recomputing_does(tmp_path):
    cached, recomputed = Weights(), Weights()
    fit(recipe(train={"cache_features": "on"}), tmp_path / "on", callbacks=[cached])
    fit(recipe(train={"cache_features": "off"}), tmp_path / "off",
        callbacks=[recomputed])
    assert_same(recomputed.values[2], cached.values[2], atol=1e-5)

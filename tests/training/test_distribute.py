"""tf.distribute: strategy choice, sharded and seeded input, one vs two replicas.

conftest.py splits the CPU into two logical devices, so MirroredStrategy runs here
without GPUs.
"""

import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy import data
from kgreedy.base.errors import RecipeError
from kgreedy.base.progress import Progress
from kgreedy.config.data_checks import check_against_data
from kgreedy.config.recipe import DistributeConfig, recipe_from_dict
from kgreedy.training import distribute
from kgreedy.training.actions import Action
from kgreedy.training.run import fit_recipe
from kgreedy.training.rundir import RunDir


def recipe(**overrides):
    raw = {
        "name": "dist",
        "seed": 3,
        "data": {"augment": "cifar"},
        "model": {"blocks": [{"width": 8}, {"width": 8, "downsample": "psi"}],
                  "sync_batch_norm": True},
        "aux": {"k": 2, "width": 8},
        "train": {"epochs_per_stage": 2, "batch_size": 32, "steps_per_epoch": 3,
                  "steps_per_execution": 2,
                  # float32: replicas match one device to 1e-6 only in float32.
                  "mixed_precision": "none",
                  "optimizer": {"name": "sgd", "learning_rate": 0.05}},
        "export": {"enabled": False},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return recipe_from_dict(raw)


def load(r):
    spec = data.describe(r.data)
    return data.load(r.data, spec, batch_size=r.train.batch_size, seed=r.seed)


# ------------------------------------------------------------- strategies ----

def test_strategies_from_the_recipe():
    default = distribute.make_strategy(DistributeConfig(strategy="default"))
    assert default.num_replicas_in_sync == 1
    mirrored = distribute.make_strategy(DistributeConfig(strategy="mirrored", logical_cpus=2))
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2
    auto = distribute.make_strategy(DistributeConfig(strategy="auto", logical_cpus=2))
    assert auto.num_replicas_in_sync == 2
    one = distribute.make_strategy(DistributeConfig(strategy="auto"))
    assert one.num_replicas_in_sync == 1  # no GPUs here, one logical CPU asked for
    assert distribute.WorkerInfo(mirrored).is_chief


def test_logical_cpus_after_tensorflow_started_is_a_clear_error():
    with pytest.raises(RecipeError, match=r"distribute.logical_cpus: TensorFlow has already "
                                          r"initialised .*received 4"):
        distribute.configure_devices(DistributeConfig(strategy="mirrored", logical_cpus=4))
    distribute.configure_devices(DistributeConfig(strategy="mirrored", logical_cpus=2))


@pytest.mark.parametrize("value,match", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "TF_CONFIG: is not valid JSON"),
    ('{"cluster": {"worker": ["localhost:1"]}}', "needs"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}',
     "task worker:3 is not in the cluster"),
])
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, value, match):
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(RecipeError, match=match):
        distribute.make_strategy(DistributeConfig(strategy="multi_worker"))


def test_global_batch_must_split_over_the_replicas():
    with pytest.raises(RecipeError, match=r"train.batch_size: must be divisible by the 2 "
                                          r"replicas.*received 33"):
        check_against_data(recipe(train={"batch_size": 33}), 8, num_replicas=2)


def test_logical_cpus_is_validated():
    with pytest.raises(RecipeError, match=r"distribute.logical_cpus.*received 0"):
        recipe(distribute={"logical_cpus": 0})
    with pytest.raises(RecipeError, match=r"distribute.logical_cpus: only applies to "
                                          r"strategies 'auto' and 'mirrored'.*received 2"):
        recipe(distribute={"strategy": "multi_worker", "logical_cpus": 2})


# ------------------------------------------------------------------ input ----

def batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_every_example_once_per_epoch_across_workers():
    datasets = load(recipe(data={"augment": "none"}))
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        for x, _ in batches(datasets.train_for(0, 0, context)):
            assert x.shape[0] == 16  # per-replica batch = global / replicas
            seen += [img.tobytes() for img in x]
    everything = [x.tobytes() for x, _ in datasets.train_source.as_numpy_iterator()]
    assert len(seen) == len(set(seen))  # no example twice
    assert set(seen) <= set(everything)
    assert len(seen) >= len(everything) - 2 * 16  # only the partial batches are dropped


def test_epochs_are_seeded_and_resumable_mid_epoch():
    datasets = load(recipe())
    epoch0, again = batches(datasets.train_for(0)), batches(datasets.train_for(0))
    epoch1 = batches(datasets.train_for(1))
    for (x0, y0), (x1, y1) in zip(epoch0, again):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    assert not np.array_equal(epoch0[0][0], epoch1[0][0])
    # Entering the epoch at step 5 gives exactly its batches from 5 on, augmentation
    # included: draws depend on the example's position, not on what ran before.
    resumed = batches(datasets.train_for(0, skip_steps=5))
    assert len(resumed) == len(epoch0) - 5
    for (x0, y0), (x1, y1) in zip(epoch0[5:], resumed):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)


def test_per_replica_batches_make_up_the_global_batch():
    datasets = load(recipe())
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=2)
    whole = batches(datasets.train_for(2))
    halves = batches(datasets.train_for(2, 0, context))
    for i, (x, y) in enumerate(whole[:4]):
        np.testing.assert_array_equal(x, np.concatenate([halves[2 * i][0], halves[2 * i + 1][0]]))
        np.testing.assert_array_equal(y, np.concatenate([halves[2 * i][1], halves[2 * i + 1][1]]))


# ------------------------------------------------------------ equivalence ----

class Weights(Action):
    def on_stage_end(self, trainer, stage, loop):
        net = trainer.net
        self.values = {w.path: np.array(w.numpy())
                       for layer in net.modules + net.heads for w in layer.weights}


def train_with(strategy, run_dir):
    r = recipe()
    keras.utils.set_random_seed(r.seed)  # the same initial weights for both
    datasets = load(r)
    os.makedirs(run_dir)
    weights = Weights()
    _, summary = fit_recipe(r, datasets, RunDir(run_dir), strategy,
                            progress=Progress(io.StringIO(), live=False), actions=[weights])
    return weights.values, summary


@pytest.mark.slow
def test_two_replicas_train_the_same_weights_as_one(tmp_path):
    one, summary_one = train_with(tf.distribute.get_strategy(), tmp_path / "one")
    two, summary_two = train_with(
        tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), tmp_path / "two")
    assert one.keys() == two.keys()
    # Measured: <= 1e-6 apart with synchronised BN, ~1e-2 with per-replica BN
    # statistics. Longer runs drift further apart: synchronised BN computes the
    # variance as E[x^2] - E[x]^2, which loses digits on the near-constant channels
    # that the digits' blank borders produce, and training amplifies that.
    moved = 0
    for path, value in one.items():
        np.testing.assert_allclose(two[path], value, rtol=0, atol=1e-5, err_msg=path)
        moved += "kernel" in path
    assert moved >= 4
    # Both evaluated every example once; their accuracies agree.
    metrics = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert all(m["val_examples"] == 360 for m in metrics)
    assert summary_one["final"]["val_accuracy"] == pytest.approx(
        summary_two["final"]["val_accuracy"], abs=0.01)

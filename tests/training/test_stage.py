"""The inner loop and the epoch driver, directly: `StageLoop` trains only its stage,
counts its own steps, keeps train and eval sums apart; `EpochDriver` positions each
epoch from that counter, also when a loss-scaled step is skipped (mixed_float16)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy import data
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.training.actions import Action
from kgreedy.training.driver import EpochDriver
from kgreedy.training.rundir import stage_checkpoint
from kgreedy.training.stage import StageLoop

STEPS, BATCH = 6, 32


def _recipe(**train):
    return recipe_from_dict({
        "name": "loop",
        "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}]},
        "aux": {"k": 1},
        "train": {"epochs_per_stage": 3, "batch_size": BATCH, "steps_per_epoch": STEPS,
                  "steps_per_execution": 4, "optimizer": {"learning_rate": 0.05}, **train},
    })


@pytest.fixture(scope="module")
def datasets():
    r = _recipe()
    loaded = data.load(r.data, data.describe(r.data), batch_size=BATCH, seed=0)
    yield loaded
    loaded.close()


def _net(recipe, datasets):
    spec = datasets.spec
    keras.utils.set_random_seed(0)
    return from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean, spec.std)


def _weights(layer):
    return [w.numpy().copy() for w in layer.weights]


def test_a_stage_trains_its_block_and_head_and_counts_its_own_steps(datasets):
    recipe = _recipe()
    net = _net(recipe, datasets)
    strategy = tf.distribute.get_strategy()
    loop = StageLoop(net, 2, recipe.train, strategy, STEPS)
    frozen, own = _weights(net.modules[0]), _weights(net.modules[1]) + _weights(net.heads[1])
    other_head = _weights(net.heads[0])
    result = loop.train_epoch(datasets.distributed_train(strategy, 2, 1, recipe.train))
    assert loop.step == STEPS and int(loop.optimizer.iterations.numpy()) == STEPS
    assert float(loop.train_sums["count"].numpy()) == STEPS * BATCH
    assert 0 < result["train_loss"] < 10 and 0 <= result["train_accuracy"] <= 1
    for before, after in zip(frozen + other_head,
                             _weights(net.modules[0]) + _weights(net.heads[0])):
        np.testing.assert_array_equal(before, after)  # block 1 (BN stats too), head 1
    changed = [not np.array_equal(b, a) for b, a in
               zip(own, _weights(net.modules[1]) + _weights(net.heads[1]))]
    assert all(changed[:2]) and sum(changed) >= len(changed) // 2
    # Evaluating in the middle of an epoch leaves the epoch's train sums alone: a
    # mid-epoch checkpoint holds them.
    train_figures = loop.metrics()
    scores = loop.evaluate(datasets.distributed_eval(strategy))
    assert scores["val_examples"] == datasets.spec.num_eval
    assert loop.metrics() == train_figures


def _spy_positions(datasets, monkeypatch):
    calls = []
    original = datasets.distributed_train

    def spy(strategy, stage, epoch, train, skip_steps=0, source=None):
        calls.append((epoch, skip_steps))
        return original(strategy, stage, epoch, train, skip_steps, source)

    monkeypatch.setattr(datasets, "distributed_train", spy)
    return calls


@pytest.mark.slow
def test_skipped_loss_scaled_steps_leave_epoch_position_metrics_and_data_order(
        datasets, monkeypatch, tmp_path):
    recipe = _recipe(mixed_precision="mixed_float16")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        net = _net(recipe, datasets)
        strategy = tf.distribute.get_strategy()
        loop = StageLoop(net, 1, recipe.train, strategy, STEPS)
        # Overflow from the first step on: the scale halves per skipped step, so
        # 2^40 skips every step of epoch 1 (float16 gradients overflow above 2^16).
        loop.optimizer.dynamic_scale.assign(2.0 ** 40)
        records = []
        driver = EpochDriver(loop, datasets, 3, datasets.distributed_eval(strategy),
                             actions=[type("Keep", (Action,), {"after_epoch": staticmethod(
                                 lambda d, record: records.append(record))})()])
        calls = _spy_positions(datasets, monkeypatch)
        driver.run(2)
        skipped = loop.step - int(loop.optimizer.iterations.numpy())
        assert skipped >= 1, "the test must really skip a step"
        assert loop.step == 2 * STEPS
        assert driver.position() == (3, 0)
        # Every epoch started at its first step and ran all its steps.
        assert calls == [(1, 0), (2, 0)]
        assert [r["epoch"] for r in records] == [1, 2]
        assert float(loop.train_sums["count"].numpy()) == STEPS * BATCH
        assert all(np.isfinite(r["train_loss"]) for r in records)

        # Mid-epoch: checkpoint after 4 steps of epoch 3, restore into a fresh stage,
        # and the driver continues at step 4 of epoch 3.
        driver.align = 4
        saved = {}

        class StopAfter4(Action):
            def after_chunk(self, d, epoch, done, images_per_second):
                if done == 4:
                    checkpoint = stage_checkpoint(net, 1, **d.state())
                    saved["path"] = checkpoint.save(str(tmp_path / "ckpt"))
                    raise KeyboardInterrupt

        driver.actions.append(StopAfter4())
        with pytest.raises(KeyboardInterrupt):
            driver.run(3)
        fresh_loop = StageLoop(net, 1, recipe.train, strategy, STEPS)
        fresh = EpochDriver(fresh_loop, datasets, 3, datasets.distributed_eval(strategy))
        stage_checkpoint(net, 1, **fresh.state()).restore(saved["path"])
        assert fresh.position() == (3, 4)
        assert fresh_loop.step == 2 * STEPS + 4
        assert float(fresh_loop.train_sums["count"].numpy()) == 4 * BATCH
        calls.clear()
        fresh.run()
        assert calls == [(3, 4)]
        assert fresh_loop.step == 3 * STEPS
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_a_continued_trial_starts_its_schedule_and_counter_at_its_epoch(datasets):
    recipe = _recipe(lr_schedule={"name": "cosine"})
    net = _net(recipe, datasets)
    strategy = tf.distribute.get_strategy()
    loop = StageLoop(net, 1, recipe.train, strategy, STEPS)
    driver = EpochDriver(loop, datasets, 3, datasets.distributed_eval(strategy))
    first_rate = loop.learning_rate
    driver.start_at(3)
    assert driver.position() == (3, 0)
    assert loop.step == 2 * STEPS and loop.learning_rate < first_rate
    record = driver.run()
    assert record["epoch"] == 3 and loop.step == 3 * STEPS

"""The training engine: freezing, optimizers per stage, schedules, run directory."""

import io
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from kgreedy import data
from kgreedy.base.progress import Progress
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.training import rundir
from kgreedy.training.actions import Action
from kgreedy.training.run import fit_recipe
from kgreedy.training.optim import StageSchedule, l2_penalty, make_optimizer
from kgreedy.training.rundir import RunDir

STEPS = 3


def tiny_recipe(**train):
    return recipe_from_dict({
        "name": "tiny",
        "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"},
                             {"width": 8, "downsample": "avgpool"}]},
        "aux": {"k": 2, "width": 4},
        "train": {"epochs_per_stage": 2, "batch_size": 32, "steps_per_epoch": STEPS,
                  "steps_per_execution": 2, **train},
        "export": {"enabled": False},
    })


class Snapshots(Action):
    """Copies of every weight of the net at the end of each stage."""

    def __init__(self, fail_after=None):
        self.weights = {}
        self.optimizers = {}
        self.trained = {}
        self.fail_after = fail_after

    def on_stage_end(self, trainer, stage, loop):
        net = trainer.net
        self.weights[stage] = {w.path: w.numpy().copy()
                               for layer in net.modules + net.heads for w in layer.weights}
        self.optimizers[stage] = loop.optimizer
        self.trained[stage] = {v.path for v in loop.variables}
        if stage == self.fail_after:
            raise KeyboardInterrupt("simulated stop after stage %d" % stage)


def train(recipe, run_dir, callbacks=(), resume=False, stream=None):
    spec = data.describe(recipe.data)
    datasets = data.load(recipe.data, spec, batch_size=recipe.train.batch_size, seed=0)
    os.makedirs(run_dir, exist_ok=True)
    return fit_recipe(recipe, datasets, RunDir(run_dir), tf.distribute.get_strategy(),
                      resume=resume, progress=Progress(stream or io.StringIO(), live=False),
                      actions=callbacks)


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("greedy")
    snaps = Snapshots()
    stream = io.StringIO()
    trainer, summary = train(tiny_recipe(), run_dir, [snaps], stream=stream)
    return trainer, summary, snaps, run_dir, stream.getvalue()


def test_frozen_blocks_are_bitwise_unchanged_by_later_stages(greedy_run):
    trainer, _, snaps, _, _ = greedy_run
    for stage in (1, 2):
        before = snaps.weights[stage]
        after = snaps.weights[stage + 1]
        frozen = [p for p in before
                  if any(p.startswith(f"stage{j}_block/") for j in range(1, stage + 1))]
        # BN moving statistics included: the prefix runs with training=False.
        assert any("moving_mean" in p for p in frozen)
        for path in frozen:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        trained = [p for p in before if p.startswith(f"stage{stage + 1}_block/")]
        assert any(not np.array_equal(after[p], before[p]) for p in trained)


def test_each_stage_gets_a_new_optimizer_over_its_own_variables(greedy_run):
    trainer, _, snaps, _, _ = greedy_run
    optimizers = list(snaps.optimizers.values())
    assert len({id(o) for o in optimizers}) == 3
    for stage, opt in snaps.optimizers.items():
        # A fresh optimizer counts only its own stage's steps.
        assert int(opt.iterations) == 2 * STEPS
        tracked = {v.path for v in opt._trainable_variables}
        assert tracked == snaps.trained[stage]
        assert tracked and all(p.startswith((f"stage{stage}_block/", f"stage{stage}_head/"))
                               for p in tracked)
        # BN moving statistics are never handed to the optimizer.
        assert not any("moving" in p for p in tracked)


def test_run_directory_records(greedy_run):
    _, summary, _, run_dir, log = greedy_run
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [(r["stage"], r["epoch"]) for r in lines] == [(s, e) for s in (1, 2, 3)
                                                        for e in (1, 2)]
    for r in lines:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                    "learning_rate", "images_per_second", "seconds", "cpu_seconds",
                    "wall_seconds"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        # The epoch's cost includes its evaluation; two threads may beat the wall.
        assert 0 < r["seconds"] < r["wall_seconds"] and r["cpu_seconds"] > 0
    on_disk = json.load(open(os.path.join(run_dir, "summary.json")))
    assert [s["stage"] for s in on_disk["stages"]] == [1, 2, 3]
    assert on_disk["final"]["val_accuracy"] == on_disk["stages"][-1]["val_accuracy"]
    assert on_disk["final"]["export_path"] is None
    assert 0.0 <= on_disk["final"]["val_accuracy"] <= 1.0
    for stage in (1, 2, 3):
        assert tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints",
                                                       f"stage{stage}"))
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(os.path.join(run_dir, "tensorboard")))
    # Not a terminal: one line per epoch, no carriage returns.
    assert "\r" not in log
    assert log.count(" epoch ") == 6


def test_records_and_stages_carry_the_peak_memory_since_the_stage_began(greedy_run):
    _, summary, _, run_dir, log = greedy_run
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    gpu = bool(tf.config.list_logical_devices("GPU"))
    for r in lines:
        assert isinstance(r["peak_memory_mb"], float) and r["peak_memory_mb"] > 0, r
        assert (r["gpu_peak_memory_mb"] is not None) == gpu, r
    on_disk = json.load(open(os.path.join(run_dir, "summary.json")))
    for entry in on_disk["stages"]:
        mine = [r["peak_memory_mb"] for r in lines if r["stage"] == entry["stage"]]
        # The stage's peak: the largest of its epochs' and of its end after them.
        assert entry["peak_memory_mb"] >= max(mine) > 0, (entry, mine)
        assert entry["peak_memory_since"] == "stage"  # clear_refs works here
        assert "gpu_peak_memory_mb" in entry
    assert [e["peak_memory_mb"] for e in summary["stages"]] == [
        e["peak_memory_mb"] for e in on_disk["stages"]]
    # Every epoch line and stage line shows it.
    assert log.count(" peak ") == 6 + 3 and "s, peak " in log
    events = [p for p in os.listdir(os.path.join(run_dir, "tensorboard"))
              if p.startswith("events.out.tfevents")]
    tags = {value.tag for path in events for event in tf.compat.v1.train.summary_iterator(
        os.path.join(run_dir, "tensorboard", path)) for value in event.summary.value}
    assert {"stage1/peak_memory_mb", "all/peak_memory_mb"} <= tags
    assert ("all/gpu_peak_memory_mb" in tags) == gpu


def test_checkpoints_restore_every_weight(greedy_run):
    trainer, _, _, run_dir, _ = greedy_run
    for stage in (2, 3):
        _, _, restored, got = rundir.load_trained(run_dir, stage)
        assert got == stage
        if stage == 3:  # the live net is at its final state
            live = {w.path: w.numpy() for layer in trainer.net.modules + trainer.net.heads
                    for w in layer.weights}
            for layer in restored.modules + restored.heads:
                for w in layer.weights:
                    np.testing.assert_array_equal(w.numpy(), live[w.path], err_msg=w.path)
        else:  # stage 2's own head and block, as they were at its end
            snap = greedy_run[2].weights[2]
            for layer in restored.modules[:2] + restored.heads[:2]:
                for w in layer.weights:
                    np.testing.assert_array_equal(w.numpy(), snap[w.path], err_msg=w.path)


@pytest.mark.slow
def test_end_to_end_trains_every_block_with_the_last_head(tmp_path):
    snaps = Snapshots()
    recipe = tiny_recipe(mode="end_to_end", epochs_per_stage=1)
    trainer, summary = train(recipe, tmp_path / "run", [snaps])
    assert [s["stage"] for s in summary["stages"]] == [3]
    opt = snaps.optimizers[3]
    tracked = {v.path for v in opt._trainable_variables}
    assert {"stage1_block/conv/kernel", "stage2_block/conv/kernel",
            "stage3_block/conv/kernel", "stage3_head/dense/kernel"} <= tracked
    assert not any(p.startswith(("stage1_head", "stage2_head")) for p in tracked)
    assert summary["stages"][0]["frozen_params"] == 0


@pytest.mark.slow
def test_resume_skips_finished_stages(tmp_path):
    run_dir = tmp_path / "run"
    first = Snapshots(fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe(), run_dir, [first])
    second = Snapshots()
    _, summary = train(tiny_recipe(), run_dir, [second], resume=True)
    assert sorted(second.weights) == [2, 3]
    for path, value in first.weights[1].items():
        if path.startswith("stage1_block/"):
            np.testing.assert_array_equal(second.weights[3][path], value)
    assert [s["stage"] for s in summary["stages"]] == [1, 2, 3]


def test_step_schedule_decays_per_stage():
    s = StageSchedule(0.1, steps_per_epoch=10, epochs=50, kind="step",
                      decay_every_epochs=15, decay_factor=0.2)
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(149)) == pytest.approx(0.1)
    assert float(s(150)) == pytest.approx(0.02)
    assert float(s(300)) == pytest.approx(0.004)


def test_cosine_schedule_with_warmup():
    s = StageSchedule(1.0, steps_per_epoch=10, epochs=11, kind="cosine", warmup_epochs=1,
                      final_fraction=0.1)
    assert float(s(0)) == pytest.approx(0.1)  # first of 10 warm-up steps
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5)
    assert float(s(110)) == pytest.approx(0.1)


def test_l2_weight_decay_is_coupled_and_decoupled_goes_to_keras():
    recipe = tiny_recipe(optimizer={"weight_decay": 0.01, "weight_decay_type": "l2"})
    w = tf.Variable([[1.0, -2.0]])
    with tf.GradientTape() as tape:
        penalty = l2_penalty(recipe.train.optimizer, [w])
    np.testing.assert_allclose(tape.gradient(penalty, w).numpy(), [[0.01, -0.02]])
    assert make_optimizer(recipe.train.optimizer, 0.1).weight_decay is None
    decoupled = tiny_recipe(optimizer={"weight_decay": 0.01,
                                       "weight_decay_type": "decoupled"})
    assert l2_penalty(decoupled.train.optimizer, [w]) is None
    assert make_optimizer(decoupled.train.optimizer, 0.1).weight_decay == 0.01
    adamw = tiny_recipe(optimizer={"name": "adamw", "learning_rate": 1e-3,
                                   "weight_decay_type": "decoupled"})
    assert type(make_optimizer(adamw.train.optimizer, 1e-3)).__name__ == "AdamW"


def test_live_progress_rewrites_one_line():
    out = io.StringIO()
    progress = Progress(out, live=True)
    progress.step(1, 1, 2, 5, 10, 0.5, 0.75, 123.0)
    progress.step(1, 1, 2, 10, 10, 0.4, 0.8, 130.0)
    text = out.getvalue()
    assert text.count("\r") == 2 and "\n" not in text
    assert "stage 1 epoch 1/2 step 10/10 loss 0.4000 acc 0.8000" in text
    assert "130 img/s" in text

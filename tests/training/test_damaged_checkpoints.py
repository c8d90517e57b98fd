"""Damaged checkpoints and late SIGTERMs (issue 25, defects 5, 6 and 12), in-process on
a two-stage digits run of 2 epochs of 3 steps per stage (docs/resume.md, "Damaged
checkpoints").

- Every checkpoint of the stage in progress unreadable: the stage starts again from the
  stage before it, with a warning.
- A finished stage's final checkpoint unreadable: the stage trains again from its older
  checkpoint (summary.json and metrics.jsonl rewound), unless a later stage's
  checkpoint holds its weights.
- `kgreedy.export` (and `--stage N`) take the same fallback, read-only.
- SIGTERM after the last stage's training or inside the export: exit 75, no half
  version, and `--resume` exports.
"""

import json
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from kgreedy import cli, data, export, train
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.serving import warmup_file
from kgreedy.training import controller, run_actions, rundir

pytestmark = pytest.mark.slow  # real (tiny) training runs

RECIPE = {
    "name": "damage",
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}]},
    "aux": {"k": 1},
    "train": {"epochs_per_stage": 2, "batch_size": 32, "steps_per_epoch": 3,
              "steps_per_execution": 3, "optimizer": {"learning_rate": 0.05}},
    "export": {"enabled": False},
}
DATA = ".data-00000-of-00001"


def status(main, argv):
    """`kgreedy.cli.run(main, argv)`'s exit status, also when it exits (status 2)."""
    try:
        return cli.run(main, argv)
    except SystemExit as e:
        return e.code


def write_recipe(tmp_path, exporting=False):
    path = tmp_path / "recipe.json"
    # An exporting run also sets a pixel limit of its own, which its export must keep.
    extra = {"data": {"max_pixels": 5000}} if exporting else {}
    path.write_text(json.dumps({**RECIPE, **extra, "export": {"enabled": exporting}}))
    return str(path)


class _Stop(BaseException):
    """A kill at a chosen point (a BaseException, as a SIGKILL leaves no handler)."""


def train_until(monkeypatch, recipe, run_dir, stage, epoch=None):
    """Trains until the end of (stage, epoch), its checkpoint written, and stops; with
    no epoch, once the stage is finished (in summary.json)."""
    after_epoch, fit_stage = run_actions.EpochLines.after_epoch, \
        controller.GreedyTrainer._fit_stage

    def epoch_end(self, driver, record):
        after_epoch(self, driver, record)
        if (record["stage"], record["epoch"]) == (stage, epoch):
            raise _Stop()

    def stage_end(self, number, *args):
        fit_stage(self, number, *args)
        if number == stage and epoch is None:
            raise _Stop()

    with monkeypatch.context() as m:
        m.setattr(run_actions.EpochLines, "after_epoch", epoch_end)
        m.setattr(controller.GreedyTrainer, "_fit_stage", stage_end)
        with pytest.raises(_Stop):
            train.main([recipe, "--output", str(run_dir)])


def damage(prefix, suffix=DATA):
    path = prefix + suffix
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def ckpt(run_dir, stage, number):
    return str(run_dir / "checkpoints" / f"stage{stage}" / f"ckpt-{number}")


def epochs(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["epoch"]) for r in map(json.loads, lines)]


def block1(run_dir, prefix):
    """Module 1's weights (kernel, BN) in a checkpoint, restored into a fresh net."""
    recipe = recipe_from_dict(json.loads((run_dir / "recipe.json").read_text()))
    spec = data.load_spec(str(run_dir / "dataset.json"))
    net = from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean, spec.std)
    rundir.stage_checkpoint(net, 1).restore(prefix).expect_partial()
    return [w.numpy() for w in net.modules[0].weights]


def assert_same(weights, expected):
    assert len(weights) == len(expected) >= 3
    for got, want in zip(weights, expected):
        np.testing.assert_array_equal(got, want)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("stage", [1, 2])
def test_every_checkpoint_of_the_stage_in_progress_unreadable_restarts_it(
        tmp_path, monkeypatch, capsys, stage):
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "run"
    train_until(monkeypatch, recipe, run_dir, stage, 1)
    damage(ckpt(run_dir, stage, 3), ".index")
    capsys.readouterr()
    assert status(train.main, [recipe, "--output", str(run_dir), "--resume"]) == 0
    err = capsys.readouterr().err
    start = "stage 1's final weights" if stage == 2 else "its initial weights"
    assert (f"kgreedy: warning: stage {stage}: unreadable checkpoint ckpt-3 (" in err
            and f"); moved to {run_dir}/checkpoints/stage{stage}/damaged; "
            f"stage {stage} goes on from {start}; summary.json and metrics.jsonl are "
            "rewound to it" in err), err
    assert epochs(run_dir) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [e["stage"] for e in summary(run_dir)["stages"]] == [1, 2]
    assert sorted(os.listdir(run_dir / "checkpoints" / f"stage{stage}" / "damaged")) == [
        "ckpt-3" + DATA, "ckpt-3.index"]
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints" / f"stage{stage}")) \
        == ckpt(run_dir, stage, 6)


def test_a_finished_stage_whose_final_checkpoint_is_unreadable_trains_again(
        tmp_path, monkeypatch, capsys):
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "run"
    train_until(monkeypatch, recipe, run_dir, 1)  # stage 1 finished, stage 2 not begun
    assert [e["stage"] for e in summary(run_dir)["stages"]] == [1]
    epoch1 = block1(run_dir, ckpt(run_dir, 1, 3))
    damage(ckpt(run_dir, 1, 6))

    # Read-only tools fall back with a warning saying what the weights are not.
    capsys.readouterr()
    assert status(export.main, [str(run_dir), "--stage", "1"]) == 0
    err = capsys.readouterr().err
    assert "kgreedy: warning: stage 1: unreadable checkpoint ckpt-6 (" in err
    assert (f"falling back to {ckpt(run_dir, 1, 3)}, which is older than the final "
            "weights summary.json reports for stage 1; rerun kgreedy.train with --resume "
            "to train the stage again") in err
    assert os.path.exists(ckpt(run_dir, 1, 6) + DATA)  # a reader moves nothing

    assert status(train.main, [recipe, "--output", str(run_dir), "--resume"]) == 0
    err = capsys.readouterr().err
    assert (f"stage 1 is no longer finished and goes on from {ckpt(run_dir, 1, 3)}; "
            "summary.json and metrics.jsonl are rewound to it") in err, err
    assert epochs(run_dir) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    final1 = block1(run_dir, ckpt(run_dir, 1, 6))  # a new, whole ckpt-6
    assert not np.array_equal(final1[0], epoch1[0])
    # Stage 2 trained on stage 1's retrained final weights, not on epoch 1's.
    assert_same(block1(run_dir, ckpt(run_dir, 2, 6)), final1)
    metrics = [json.loads(line) for line in
               (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary(run_dir)["stages"][0]["val_accuracy"] == metrics[1]["val_accuracy"]


def test_a_later_stage_keeps_a_finished_stage_whose_final_checkpoint_is_unreadable(
        tmp_path, monkeypatch, capsys):
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "run"
    train_until(monkeypatch, recipe, run_dir, 2, 1)
    final1 = block1(run_dir, ckpt(run_dir, 1, 6))
    damage(ckpt(run_dir, 1, 6), ".index")
    holder = ckpt(run_dir, 2, 3)

    capsys.readouterr()
    _, _, net, _ = rundir.load_trained(str(run_dir), 1)  # as export and probe do
    assert f"its weights are taken from {holder}" in capsys.readouterr().err
    assert_same([w.numpy() for w in net.modules[0].weights], final1)

    assert status(train.main, [recipe, "--output", str(run_dir), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert (f"saved again as {ckpt(run_dir, 1, 6)}; stage 1's weights are intact in "
            f"{holder}") in err, err
    assert "stage 2: resuming at epoch 2, step 0 of 3" in out
    assert epochs(run_dir) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert_same(block1(run_dir, ckpt(run_dir, 1, 6)), final1)


def test_export_of_a_stage_with_no_readable_checkpoint_is_one_line(tmp_path, monkeypatch,
                                                                    capsys):
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "run"
    train_until(monkeypatch, recipe, run_dir, 1)
    damage(ckpt(run_dir, 1, 6))
    damage(ckpt(run_dir, 1, 3), ".index")
    capsys.readouterr()
    assert status(export.main, [str(run_dir), "--stage", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kgreedy: error: --stage: stage 1 has no readable checkpoint "
                              f"in {run_dir}/checkpoints/stage1 (unreadable checkpoints ckpt-3 (")
    assert "), ckpt-6 (" in err[-1]
    assert err[-1].endswith("); rerun kgreedy.train with --resume to train it again; "
                            "received 1")
    assert status(export.main, [str(run_dir)]) == 2  # the default stage: names the run
    assert capsys.readouterr().err.startswith(
        "kgreedy: error: RUN_DIR: stage 1 has no readable checkpoint")


def _sigterm_at_last_epoch(self, driver, record):
    if (record["stage"], record["epoch"]) == (2, 2):
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("where", ["after-training", "inside-export"])
def test_sigterm_after_the_last_chunk_stops_with_75_and_resume_exports(
        tmp_path, monkeypatch, capsys, where):
    recipe, run_dir = write_recipe(tmp_path, exporting=True), tmp_path / "run"
    root = run_dir / "export" / "damage"
    with monkeypatch.context() as m:
        if where == "after-training":
            m.setattr(run_actions.EpochLines, "after_epoch", _sigterm_at_last_epoch)
        else:
            original = warmup_file.write_warmup_requests

            def warmup(*args):
                original(*args)  # the temporary version is written whole by now
                os.kill(os.getpid(), signal.SIGTERM)

            m.setattr(warmup_file, "write_warmup_requests", warmup)
        assert status(train.main, [recipe, "--output", str(run_dir)]) == 75
    err = capsys.readouterr().err.strip().splitlines()[-1]
    when = ("before scoring the heads and exporting" if where == "after-training"
            else "while exporting")
    assert err == (f"kgreedy: preempted (SIGTERM) after the last stage (2), {when}: "
                   f"stage 2's checkpoint is in {run_dir}/checkpoints/stage2, nothing "
                   "half-written is kept; rerun with --resume to finish")
    assert not root.exists() or os.listdir(root) == []  # no version, no temporary one
    assert summary(run_dir)["final"] is None
    assert not (run_dir / ".lock").exists()

    assert status(train.main, [recipe, "--output", str(run_dir), "--resume"]) == 0
    assert os.listdir(root) == ["1"]
    assert summary(run_dir)["final"]["export_path"] == str(root / "1")
    assert epochs(run_dir) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert int(tf.saved_model.load(str(root / "1")).max_pixels[0].numpy()) == 5000

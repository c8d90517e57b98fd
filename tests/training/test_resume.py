"""Resuming, in-process: a kill before a stage's first checkpoint leaves no record
twice, `--resume` of a finished run does nothing, and a run's tools default to its
last finished stage, never a half-trained one."""

import io
import json
import os

import pytest
import tensorflow as tf

from kgreedy import data, train
from kgreedy.base.errors import KgreedyError
from kgreedy.base.progress import Progress
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.training import rundir
from kgreedy.training.run import fit_recipe
from kgreedy.training.rundir import RunDir

RECIPE = {
    "name": "again",
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}]},
    "aux": {"k": 1},
    "train": {"epochs_per_stage": 2, "batch_size": 32, "steps_per_epoch": 3,
              "steps_per_execution": 2, "optimizer": {"learning_rate": 0.05}},
    "export": {"enabled": False},
}


def _fit(recipe, run_dir, resume=False):
    datasets = data.load(recipe.data, data.describe(recipe.data), batch_size=32, seed=0)
    os.makedirs(run_dir, exist_ok=True)
    try:
        return fit_recipe(recipe, datasets, RunDir(run_dir), tf.distribute.get_strategy(),
                          resume=resume, progress=Progress(io.StringIO(), live=False))[1]
    finally:
        datasets.close()


def _epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [(r["stage"], r["epoch"]) for r in map(json.loads, f)]


@pytest.mark.slow
def test_a_kill_before_the_first_checkpoint_of_a_stage_leaves_no_record_twice(
        tmp_path, monkeypatch):
    recipe = recipe_from_dict(RECIPE)
    run_dir = tmp_path / "run"
    original = tf.train.CheckpointManager.save

    def killed_at_first_save(self, *args, **kwargs):
        # The epoch's record is written; the process dies before its checkpoint.
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", killed_at_first_save)
    with pytest.raises(KeyboardInterrupt):
        _fit(recipe, run_dir)
    assert _epochs(run_dir) == [(1, 1)]
    assert not tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "stage1"))
    monkeypatch.setattr(tf.train.CheckpointManager, "save", original)
    _fit(recipe, run_dir, resume=True)
    assert _epochs(run_dir) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def _write(tmp_path, **export):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**RECIPE, "export": {"enabled": True, **export}}))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("export", [{}, {"version": 1}], ids=["next-version", "version-1"])
def test_resume_of_a_finished_run_says_so_and_exports_nothing(tmp_path, capsys, export):
    recipe, run_dir = _write(tmp_path, **export), str(tmp_path / "run")
    assert train.main([recipe, "--output", run_dir]) == 0
    capsys.readouterr()
    root = os.path.join(run_dir, "export", "again")
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert train.main([recipe, "--output", run_dir, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "finished before (stage 2, val accuracy" in out and "nothing to do" in out
    assert "done:" not in out
    assert sorted(os.listdir(root)) == ["1"]
    assert json.loads(open(os.path.join(run_dir, "summary.json")).read()) == summary


@pytest.mark.slow
def test_tools_default_to_the_last_finished_stage(tmp_path):
    recipe = recipe_from_dict(RECIPE)
    run_dir = tmp_path / "run"
    _fit(recipe, run_dir)
    assert rundir.load_trained(str(run_dir))[3] == 2
    # Stage 2 still training: its newest checkpoint may be mid-epoch.
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["stages"] = summary["stages"][:1]
    summary["final"] = None
    summary_path.write_text(json.dumps(summary))
    assert rundir.load_trained(str(run_dir))[3] == 1
    assert rundir.load_trained(str(run_dir), 2)[3] == 2  # asked for by number
    summary["stages"] = []
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(KgreedyError, match=r"^run_dir: has no finished stage yet "
                                           r"\(stages with checkpoints: \[1, 2\]\)"):
        rundir.load_trained(str(run_dir))

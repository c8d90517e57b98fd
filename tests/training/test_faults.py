"""Resume and faults through the real command line: SIGKILL and SIGTERM mid-stage,
a corrupt newest checkpoint, a run directory in use, a non-finite loss."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.slow  # real command lines killed and resumed

RECIPE = {
    "name": "faults",
    "seed": 5,
    "data": {"augment": "cifar"},
    "model": {"blocks": [{"width": 16}, {"width": 32, "downsample": "psi"},
                         {"width": 32, "downsample": "avgpool"}]},
    "aux": {"k": 2, "width": 16},
    "train": {"epochs_per_stage": 3, "batch_size": 32, "steps_per_epoch": 12,
              "steps_per_execution": 2, "checkpoint_every_steps": 4, "deterministic": True,
              "optimizer": {"name": "sgd", "learning_rate": 0.05},
              "lr_schedule": {"name": "cosine"}},
    "distribute": {"strategy": "default"},
    "export": {"enabled": False},
}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def write_recipe(directory, **train):
    path = Path(directory) / "recipe.json"
    path.write_text(json.dumps({**RECIPE, "train": {**RECIPE["train"], **train}}))
    return path


def command(recipe, run_dir, *extra):
    return [sys.executable, "-m", "kgreedy.train", str(recipe), "--output", str(run_dir),
            *extra]


def train(recipe, run_dir, *extra):
    return subprocess.run(command(recipe, run_dir, *extra), capture_output=True, text=True,
                          env=ENV, timeout=600)


def train_until(recipe, run_dir, marker, sig):
    """Starts a run and sends `sig` as soon as stdout shows `marker`."""
    proc = subprocess.Popen(command(recipe, run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def final_weights(run_dir):
    """Every net weight in the last checkpoint of the last stage."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(
        str(Path(run_dir) / "checkpoints" / "stage3")))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("blocks/", "heads/")) and "OPTIMIZER_SLOT" not in name}


def epoch_keys(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["stage"], r["epoch"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(root)
    result = train(recipe, root / "run")
    assert result.returncode == 0, result.stderr
    return recipe, final_weights(root / "run")


def assert_bitwise_equal(weights, expected):
    assert weights.keys() == expected.keys()
    assert len(expected) > 20
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_sigkill_mid_stage_then_resume_is_bitwise_identical(reference, tmp_path):
    recipe, expected = reference
    run_dir = tmp_path / "run"
    status, _, _ = train_until(recipe, run_dir, "stage 2 epoch 1/3", signal.SIGKILL)
    assert status == -signal.SIGKILL
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [1]  # killed inside stage 2
    assert (run_dir / ".lock").exists()  # left behind by the killed process

    again = train(recipe, run_dir)  # without --resume: refused, nothing touched
    assert again.returncode == 2
    assert "--output: is not empty; pass --resume" in again.stderr

    resumed = train(recipe, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "which is no longer running; taking it over" in resumed.stderr  # stale lock
    assert "stage 2: resuming at epoch" in resumed.stdout
    assert_bitwise_equal(final_weights(run_dir), expected)
    keys = epoch_keys(run_dir)
    assert keys == [(s, e) for s in (1, 2, 3) for e in (1, 2, 3)]  # none twice
    assert not (run_dir / ".lock").exists()


def test_sigterm_checkpoints_mid_epoch_and_a_corrupt_newest_checkpoint_falls_back(
        reference, tmp_path):
    recipe, expected = reference
    run_dir = tmp_path / "run"
    status, _, err = train_until(recipe, run_dir, "stage 2 epoch 1/3", signal.SIGTERM)
    assert status == 75, err
    assert "kgreedy: preempted (SIGTERM): checkpoint written at stage 2, epoch 2, step" in err
    assert "Traceback" not in err
    assert not (run_dir / ".lock").exists()
    stage2 = run_dir / "checkpoints" / "stage2"
    newest = tf.train.latest_checkpoint(str(stage2))
    step = int(newest.rsplit("-", 1)[1])
    assert 12 < step < 24  # inside epoch 2

    # The first resume goes on from the step SIGTERM left; damage its checkpoint
    # first, so the resume must fall back to the one before.
    data_file = Path(newest + ".data-00000-of-00001")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    resumed = train(recipe, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    name = os.path.basename(newest)
    assert f"kgreedy: warning: stage 2: unreadable checkpoint {name} (" in resumed.stderr
    assert f"moved to {stage2}/damaged; stage 2 goes on from " in resumed.stderr
    assert sorted(os.listdir(stage2 / "damaged")) == [f"{name}.data-00000-of-00001",
                                                     f"{name}.index"]
    assert_bitwise_equal(final_weights(run_dir), expected)
    assert epoch_keys(run_dir) == [(s, e) for s in (1, 2, 3) for e in (1, 2, 3)]


def test_a_run_directory_in_use_is_refused(reference, tmp_path):
    recipe, _ = reference
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The reference run's saved recipe, so --resume accepts the directory.
    (run_dir / "recipe.json").write_text((recipe.parent / "run" / "recipe.json").read_text())
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run_dir / ".lock").write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        # recipe.json in the run dir is the recipe itself, so --resume accepts it.
        result = train(recipe, run_dir, "--resume")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kgreedy: error: --output: is in use by another kgreedy process")
    assert f"pid {holder.pid}" in last and "Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "recipe.json"]


def test_a_non_finite_loss_stops_with_stage_epoch_and_step(tmp_path):
    raw = {**RECIPE, "model": {"blocks": [{"width": 8}]},
           "train": {**RECIPE["train"], "checkpoint_every_steps": 1, "steps_per_execution": 1,
                     "optimizer": {"name": "sgd", "learning_rate": 1e30, "momentum": 0.0},
                     "lr_schedule": {"name": "constant"}}}
    recipe = tmp_path / "nan.json"
    recipe.write_text(json.dumps(raw))
    run_dir = tmp_path / "run"
    result = train(recipe, run_dir)
    assert result.returncode == 65, result.stderr  # EX_DATAERR: change the recipe
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("kgreedy: stage 1, epoch 1, step ")
    assert "the loss is not finite" in line
    bad_step = int(line.split("step ")[1].split(":")[0])
    saved = [int(p.name.split("-")[1].split(".")[0])
             for p in (run_dir / "checkpoints" / "stage1").glob("ckpt-*.index")]
    assert saved and all(step < bad_step for step in saved)  # nothing written after it
    assert f"last good checkpoint: {run_dir / 'checkpoints' / 'stage1'}/ckpt-{max(saved)}" in line

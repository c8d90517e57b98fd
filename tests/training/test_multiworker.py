"""Two worker processes on localhost train one recipe with MultiWorkerMirroredStrategy;
a worker killed mid-run stops the other with one line and exit status 69, and both
rerun with --resume finish the run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.slow  # two worker processes

RECIPE = {
    "name": "mw",
    "seed": 1,
    "model": {"blocks": [{"width": 8}, {"width": 8, "downsample": "psi"}],
              "sync_batch_norm": True},
    "aux": {"k": 2, "width": 8},
    "train": {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 4,
              "steps_per_execution": 2},
    "distribute": {"strategy": "multi_worker"},
}


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(root, recipe, cluster, run_dir, *extra):
    """Both workers' processes, each with its own TMPDIR below `root` (where a
    non-chief worker's scratch run directory goes); returns (processes, TMPDIRs)."""
    procs, scratch = [], []
    for index in range(2):
        tmp = root / f"tmp{index}"
        tmp.mkdir(parents=True)
        scratch.append(tmp)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(tmp),
               "PYTHONUNBUFFERED": "1",
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kgreedy.train", str(recipe), "--output", str(run_dir),
             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs, scratch


def check_finished(procs, outputs, scratch, run_dir, stages, per_module):
    """Both workers finished; only the chief wrote the run, which serves."""
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "done: stage 2" in outputs[0][0]
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["checkpoints", "dataset.json", "export", "metrics.jsonl", "recipe.json",
                     "summary.json", "tensorboard"]
    assert list(scratch[1].iterdir()) == []  # the other worker's scratch is gone
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == stages
    assert all(m["val_examples"] == 360 for m in metrics)  # each eval example once overall
    if per_module:  # every head's figures, the last equal to the run's own
        last = metrics[-1]
        assert len(last["val_module_accuracy"]) == 2
        assert last["val_module_accuracy"][-1] == last["val_accuracy"]

    export = run_dir / "export" / "mw" / "1"
    loaded = tf.saved_model.load(str(export))
    images = tf.constant(np.random.default_rng(0).uniform(0, 16, (3, 8, 8, 1)), tf.float32)
    out = loaded.signatures["serving_default"](images=images)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)


def write_recipe(tmp_path, aux=None, **train):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**RECIPE, "train": {**RECIPE["train"], **train},
                                  "aux": {**RECIPE.get("aux", {}), **(aux or {})}}))
    return recipe


def test_two_workers_train_decoupled_and_only_the_chief_writes_the_run(tmp_path):
    # Decoupled with a replay buffer: one stage; every step all-gathers both workers'
    # module outputs (and, for InfoPro's decoder, their images) into the buffer; the
    # contrastive loss takes each worker's own batch. (A greedy run with cross-entropy:
    # the test below, resumed.)
    recipe = write_recipe(tmp_path, aux={"objective": "infopro_contrast"},
                          mode="decoupled", decoupled={"buffer_size": 64})
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    run_dir = tmp_path / "run"
    procs, scratch = start_workers(tmp_path, recipe, cluster, run_dir)
    outputs = [p.communicate(timeout=600) for p in procs]
    check_finished(procs, outputs, scratch, run_dir, [2], per_module=True)


def test_a_lost_worker_stops_the_chief_in_one_line_and_both_resume_to_the_end(tmp_path):
    recipe = write_recipe(tmp_path)
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    run_dir = tmp_path / "run"
    (chief, other), _ = start_workers(tmp_path / "first", recipe, cluster, run_dir)
    try:
        for line in chief.stdout:
            if line.startswith("stage 2/2:"):  # stage 1 is done and checkpointed
                other.kill()
                break
        _, err = chief.communicate(timeout=300)  # TensorFlow notices within seconds
    finally:
        for proc in (chief, other):
            proc.kill()
            proc.wait()
    assert chief.returncode == 69, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"kgreedy: error: lost worker 1 ({cluster['worker'][1]}) of 2: "
                           "it stopped answering ("), line
    assert f"this is worker 0 ({cluster['worker'][0]})" in line
    assert line.endswith("rerun every worker's command with --resume (it continues from "
                         f"{run_dir}/checkpoints/stage1/ckpt-4)"), line

    procs, scratch = start_workers(tmp_path / "again", recipe, cluster, run_dir, "--resume")
    outputs = [p.communicate(timeout=600) for p in procs]
    check_finished(procs, outputs, scratch, run_dir, [1, 2], per_module=False)
    assert "resuming after stage 1" in outputs[0][0]

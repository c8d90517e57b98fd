"""Two worker processes on localhost train one recipe with MultiWorkerMirroredStrategy."""

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


@pytest.mark.parametrize("train, stages", [
    ({}, [1, 2]),
    # Decoupled with a replay buffer: one stage; every step all-gathers both workers'
    # module outputs into the buffer.
    ({"mode": "decoupled", "decoupled": {"buffer_size": 64}}, [2]),
], ids=["greedy", "decoupled_buffer"])
def test_two_workers_train_and_only_the_chief_writes_the_run(tmp_path, train, stages):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**RECIPE, "train": {**RECIPE["train"], **train}}))
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(2)]}
    run_dir = tmp_path / "run"
    procs, scratch = [], []
    for index in range(2):
        tmp = tmp_path / f"tmp{index}"
        tmp.mkdir()
        scratch.append(tmp)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(tmp),
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kgreedy.train", str(recipe), "--output", str(run_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "done: stage 2" in outputs[0][0]

    # The chief (worker 0) wrote the run; the other worker's scratch is gone.
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["checkpoints", "dataset.json", "export", "metrics.jsonl", "recipe.json",
                     "summary.json", "tensorboard"]
    assert list(scratch[1].iterdir()) == []
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == stages
    assert all(m["val_examples"] == 360 for m in metrics)  # each eval example once overall
    if train:  # every head's figures, the last equal to the run's own
        last = metrics[-1]
        assert len(last["val_module_accuracy"]) == 2
        assert last["val_module_accuracy"][-1] == last["val_accuracy"]

    export = run_dir / "export" / "mw" / "1"
    loaded = tf.saved_model.load(str(export))
    images = tf.constant(np.random.default_rng(0).uniform(0, 16, (3, 8, 8, 1)), tf.float32)
    out = loaded.signatures["serving_default"](images=images)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)

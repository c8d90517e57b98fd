"""Decoupled greedy learning (`train.mode: "decoupled"`, DGL): every module trains at
once on its own head's loss and no gradient crosses a module boundary (one decoupled
step updates module j as a greedy step of module j alone on the same batch and prefix
weights does); the command line records per-module figures, resumes a run killed
mid-epoch bit for bit (replay buffers included), and trains on two replicas as on
one; bad recipes are refused; `kgreedy.fit` takes one optimizer per module; the
replay buffer's ring and draws; bfloat16 and XLA.

The command-line runs share one quickstart-derived recipe (three small modules with
synchronised BN, a replay buffer of two batches) and start together in one module
fixture: an unbroken run, a run that SIGKILLs itself right after a mid-epoch
checkpoint (then resumed), and a two-replica run, each in its own process.
"""

import concurrent.futures
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import kgreedy
from kgreedy import cli, data
from kgreedy import train as train_cli
from kgreedy.base.progress import Progress
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.training.actions import Action
from kgreedy.training.run import fit_recipe
from kgreedy.training import memory
from kgreedy.training.decoupled import DecoupledLoop, ReplayBuffer
from kgreedy.training.stage import StageLoop

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
QUICKSTART = ROOT / "recipes" / "quickstart.json"
# Three command lines run at once on two cores: one thread each (as the suite's
# processes have under pytest-xdist, tests/conftest.py) unless the caller set more.
ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1",
       **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def digits_batch(count=32):
    x, y = load_digits(return_X_y=True)
    return (tf.constant(x[:count].reshape(-1, 8, 8, 1).astype("float32")),
            tf.constant(y[:count].astype("int32")))


# ------------------------------------------- no gradient crosses a module ----

STEP_RECIPE = {
    "name": "dgl_step",
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"},
                         {"width": 8, "downsample": "psi"}], "batch_norm": True},
    "aux": {"k": 2, "width": 4},
    "train": {"mode": "decoupled", "batch_size": 32,
              "optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                            "weight_decay": 5e-4, "weight_decay_type": "l2"}},
}


def _layers(net):
    return net.modules + net.heads


def _one_batch(strategy, inputs, labels):
    return strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((inputs, labels)))


def _values(layer):
    """Every weight of a layer (BN moving statistics included), by path."""
    return {w.path: w.numpy().copy() for w in layer.weights}


def test_a_decoupled_step_updates_each_module_as_a_greedy_step_on_its_prefix():
    """Module j's weights after one decoupled step equal those of one greedy step of
    module j alone on the same batch, fed the output of the same (pre-step) modules
    1..j-1 in training mode: nothing of module j+1..J reaches module j."""
    recipe = recipe_from_dict(STEP_RECIPE)
    strategy = tf.distribute.get_strategy()
    images, labels = digits_batch()

    def new_net():
        keras.utils.set_random_seed(0)
        return from_recipe(recipe, (8, 8, 1), 10, [4.9], [6.0])

    net = new_net()
    start = [layer.get_weights() for layer in _layers(net)]

    def copy():
        other = new_net()
        for layer, weights in zip(_layers(other), start):
            layer.set_weights(weights)
        return other

    before = [_values(layer) for layer in _layers(net)]
    loop = DecoupledLoop(net, recipe.train, strategy, 1)
    loop.train_epoch(_one_batch(strategy, images, labels))
    assert loop.step == 1
    assert [int(o.iterations.numpy()) for o in loop.optimizers] == [1, 1, 1]

    num = net.num_stages
    for j in range(1, num + 1):
        reference = copy()
        # A decoupled step runs every module in training mode (BN on batch
        # statistics), the prefix included, before any update.
        features = reference.features(images, j - 1, training=True)
        greedy = StageLoop(reference, j, recipe.train, strategy, 1, cached_features=True)
        greedy.train_epoch(_one_batch(strategy, features, labels))
        for mine, theirs, old in ((net.modules[j - 1], reference.modules[j - 1],
                                   before[j - 1]),
                                  (net.heads[j - 1], reference.heads[j - 1],
                                   before[num + j - 1])):
            got, expected = _values(mine), _values(theirs)
            assert got.keys() == expected.keys() and len(got) >= 4
            for path, value in expected.items():
                # Bitwise equal on this machine; a small tolerance leaves room for
                # another kernel choice (oneDNN) between the two traced graphs.
                np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7,
                                           err_msg=f"module {j}: {path}")
                assert not np.array_equal(got[path], old[path]), \
                    f"module {j}: {path} did not change: the comparison would be empty"

    # The comparison tells gradients apart: an end-to-end step (module 1 trained
    # through head J's loss) moves module 1 elsewhere than the decoupled step.
    other = copy()
    StageLoop(other, num, recipe.train, strategy, 1, end_to_end=True).train_epoch(
        _one_batch(strategy, images, labels))
    kernel = net.modules[0].trainable_weights[0]
    theirs = _values(other.modules[0])[kernel.path]
    moved = np.abs(kernel.numpy() - before[0][kernel.path]).max()
    assert np.abs(kernel.numpy() - theirs).max() > 0.1 * moved, kernel.path


# ------------------------------------------------------ the replay buffer ----

def test_the_replay_buffer_wraps_its_ring_and_draws_what_was_written():
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        buffer = ReplayBuffer(10, (2, 2, 1), module=1, seed=7, stage=3)
        twin = ReplayBuffer(10, (2, 2, 1), module=1, seed=7, stage=3)
        other_module = ReplayBuffer(10, (2, 2, 1), module=2, seed=7, stage=3)

    def batch(first):  # 4 examples whose features and labels are their own ids
        ids = tf.range(first, first + 4, dtype=tf.int32)
        return tf.cast(tf.reshape(tf.repeat(ids, 4), [4, 2, 2, 1]), tf.float32), ids

    step = tf.constant(1, tf.int64)
    for first in (100, 200, 300):
        features, labels = batch(first)
        drawn_x, drawn_y, _ = buffer.push_and_draw(features, labels, step)
        twin.push_and_draw(features, labels, step)
        other_module.push_and_draw(features, labels, step)
        step += 1
        assert drawn_x.shape == (4, 2, 2, 1) and drawn_x.dtype == tf.float32
        # The features drawn are those written with the labels drawn ...
        np.testing.assert_array_equal(drawn_x.numpy()[:, 0, 0, 0], drawn_y.numpy())
        # ... and only entries written so far (the zeros of the empty slots never).
        filled = min(int(buffer.written.numpy()), 10)
        assert set(drawn_y.numpy()) <= set(buffer.labels.numpy()[:filled]), drawn_y
        if first == 100:
            assert set(drawn_y.numpy()) <= {100, 101, 102, 103}
    assert int(buffer.written.numpy()) == 12
    # The third push wrote positions 8, 9, then 0, 1 (over the oldest, 100 and 101).
    np.testing.assert_array_equal(
        buffer.labels.numpy(), [302, 303, 102, 103, 200, 201, 202, 203, 300, 301])
    np.testing.assert_array_equal(buffer.features.numpy()[:, 1, 1, 0],
                                  buffer.labels.numpy().astype("float32"))
    # The draw is a function of (seed, module, step): the same buffer contents give
    # the same draw for the same module and step, another for another module or step.
    def draw(ring, first, at_step):
        return ring.push_and_draw(*batch(first), tf.constant(at_step, tf.int64))[:2]

    x, y = draw(buffer, 400, 9)
    x_twin, y_twin = draw(twin, 400, 9)
    _, y_module2 = draw(other_module, 400, 9)
    np.testing.assert_array_equal(y.numpy(), y_twin.numpy())
    np.testing.assert_array_equal(x.numpy(), x_twin.numpy())
    assert not np.array_equal(y.numpy(), y_module2.numpy())
    _, y_step10 = draw(buffer, 500, 10)
    _, y_step11 = draw(twin, 500, 11)
    assert not np.array_equal(y_step10.numpy(), y_step11.numpy())
    # Pushes 4 and 5 went on around the ring: positions 2..5, then 6..9.
    assert int(buffer.written.numpy()) == 20
    np.testing.assert_array_equal(
        buffer.labels.numpy(), [302, 303, 400, 401, 402, 403, 500, 501, 502, 503])


@pytest.mark.parametrize("policy, stored", [("mixed_bfloat16", tf.float32),
                                            ("mixed_float16", tf.float16)])
def test_the_replay_buffer_keeps_bfloat16_outputs_in_float32(policy, stored):
    # MultiWorkerMirroredStrategy broadcasts a new variable's value with
    # CollectiveBcastSend, which rejects bfloat16: a bfloat16 ring failed to build
    # under multi_worker. Reads come back in the outputs' own dtype.
    keras.mixed_precision.set_global_policy(policy)  # conftest resets it
    buffer = ReplayBuffer(8, (2, 2, 1), module=1, seed=7, stage=3)
    assert buffer.features.dtype == stored
    compute = tf.as_dtype(policy[len("mixed_"):])
    features = tf.cast(tf.reshape(tf.range(16), [4, 2, 2, 1]), compute)
    drawn, _, _ = buffer.push_and_draw(features, tf.range(4), tf.constant(1, tf.int64))
    assert drawn.dtype == compute
    r = recipe_from_dict({**BASE, "train": {**BASE["train"], "mixed_precision": policy,
                                            "decoupled": {"buffer_size": 32}}})
    net = from_recipe(r, (8, 8, 1), 10, [0.0], [1.0])
    expected = stored.size * 32 * sum(math.prod(s) for s in net.stage_shapes[:-1])
    assert memory.replay_buffer_bytes(net, r.train) == expected


# ------------------------------------------------------------ the recipe ----

BASE = {
    "name": "tiny_decoupled",
    "data": {"source": "digits"},
    "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"}],
              "batch_norm": False},
    "aux": {"k": 1},
    "train": {"mode": "decoupled", "epochs_per_stage": 1, "batch_size": 32},
    "export": {"enabled": False},
}


@pytest.mark.parametrize("sets,fragments", [
    (["train.mode=greedy", "train.decoupled.buffer_size=64"],
     ["train.decoupled.buffer_size:", "'decoupled'", "'greedy'", "received 64"]),
    (["train.decoupled.buffer_size=16"],
     ["train.decoupled.buffer_size:", "train.batch_size 32", "received 16"]),
    (["train.cache_features=on"],
     ["train.cache_features:", "'decoupled'", "received 'on'"]),
    (["train.decoupled.bufer_size=64"],
     ["train.decoupled.bufer_size: unknown key", "received 64"]),
], ids=["buffer-in-greedy-mode", "buffer-smaller-than-a-batch", "cache-features-on",
        "misspelt-key"])
def test_bad_decoupled_settings_exit_2_with_one_line(tmp_path, capsys, sets, fragments):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(BASE))
    run_dir = tmp_path / "run"
    argv = [str(path), "--output", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_cli.main, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kgreedy: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not run_dir.exists()
    # Each case fails for its own reason: without the bad setting the recipe loads.
    ok = [s for s in sets if not s.startswith(("train.decoupled", "train.cache"))]
    assert load_recipe(str(path), ok).train.decoupled.buffer_size == 0


# ---------------------------------------------------------- kgreedy.fit ----

def test_fit_decoupled_calls_the_optimizer_factory_once_per_module():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="mid")(h)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="top")(h)
    net = kgreedy.split(keras.Model(inputs, h), at=["stem", "mid"], num_classes=10,
                        head=kgreedy.heads.Conv(k=1, width=4), mean=5.0, std=6.0,
                        batch_norm_momentum=0.5)  # settles in the fit's 3 steps: no warning
    x, y = load_digits(return_X_y=True)
    ds = tf.data.Dataset.from_tensor_slices(
        (x[:96].reshape(-1, 8, 8, 1).astype("float32"), y[:96])).batch(32)
    made = []

    def factory(j):
        made.append((j, keras.optimizers.SGD(0.05)))
        return made[-1][1]

    history = kgreedy.fit(net, ds, ds, epochs_per_stage=1, mode="decoupled",
                          optimizer=factory, verbose=0)
    assert [j for j, _ in made] == [1, 2, 3]
    assert len({id(o) for _, o in made}) == 3
    # Each module's optimizer took every step (one pass: 3 batches).
    assert [int(o.iterations.numpy()) for _, o in made] == [3, 3, 3]
    logs = history.history
    for j in (1, 2, 3):
        for key in (f"module{j}_accuracy", f"val_module{j}_accuracy", f"module{j}_loss",
                    f"val_module{j}_loss"):
            assert len(logs[key]) == 1 and math.isfinite(logs[key][0]), key
    assert logs["val_module3_accuracy"] == logs["val_accuracy"]
    assert logs["module3_loss"] == logs["loss"]


# -------------------------------------------- bfloat16 and XLA, in-process ----

class _Keep(Action):
    """The epoch records and the loop."""

    def __init__(self):
        self.records, self.loop = [], None

    def after_epoch(self, driver, record):
        self.records.append(record)

    def on_stage_end(self, trainer, stage, loop):
        self.loop = loop


@pytest.mark.parametrize("train,objective", [
    ({"mixed_precision": "mixed_bfloat16", "decoupled": {"buffer_size": 32}},
     "cross_entropy"),
    ({"mixed_precision": "mixed_bfloat16", "decoupled": {"buffer_size": 32}},
     "infopro_contrast"),
    ({"jit_compile": True}, "cross_entropy"),
    ({"jit_compile": True}, "infopro"),
], ids=["mixed_bfloat16-with-buffer", "mixed_bfloat16-with-buffer-infopro_contrast",
        "jit_compile", "jit_compile-infopro"])
def test_decoupled_trains_in_bfloat16_with_a_buffer_and_under_xla(train, objective):
    recipe = recipe_from_dict({**BASE, "seed": 1, "aux": {**BASE.get("aux", {}),
                                                          "objective": objective},
                               "train": {**BASE["train"], "batch_size": 16,
                                         "steps_per_epoch": 3, "steps_per_execution": 2,
                                         **train}})
    datasets = data.load(recipe.data, data.describe(recipe.data), batch_size=16, seed=1)
    kept = _Keep()
    try:
        trainer, summary = fit_recipe(recipe, datasets, None, tf.distribute.get_strategy(),
                                      progress=Progress(io.StringIO(), live=False),
                                      actions=[kept])
        if "mixed_precision" in train:
            assert trainer.net.modules[0].compute_dtype == "bfloat16"
            # Module 1's bfloat16 outputs went through its buffer, stored in float32
            # (CollectiveBcastSend has no bfloat16 kernel).
            [buffer] = kept.loop.buffers
            assert buffer.features.dtype == tf.float32
            # InfoPro's decoder rebuilds the drawn outputs' own images, kept beside them.
            assert (buffer.images is not None) == (objective != "cross_entropy")
            assert int(buffer.written.numpy()) == 3 * 16
        else:
            assert kept.loop.buffers == []
    finally:
        keras.mixed_precision.set_global_policy("float32")
        datasets.close()
    [record] = kept.records
    assert record["stage"] == 2
    for key in ("train_module_loss", "val_module_loss"):
        assert len(record[key]) == 2 and all(math.isfinite(v) and v > 0
                                             for v in record[key]), (key, record[key])
    assert summary["final"]["stage"] == 2
    assert len(summary["final"]["head_val_accuracies"]) == 2


# ------------------------------------------------------ the command line ----

STEPS = 6
KILL_AT = 8  # checkpoint of epoch 2, step 2
COMMON = {
    "train.mode": "decoupled", "train.epochs_per_stage": 2, "train.steps_per_epoch": STEPS,
    "train.steps_per_execution": 2, "train.checkpoint_every_steps": 2,
    "train.batch_size": 32, "train.decoupled.buffer_size": 64,
    "train.deterministic": True, "model.sync_batch_norm": True, "aux.width": 8,
    # float32 wherever these run: two replicas match one to 2e-5 only in float32.
    "train.mixed_precision": "none",
    "model.blocks": [{"width": 8}, {"width": 16, "downsample": "psi"},
                     {"width": 16, "downsample": "psi"}],
}

# Dies by SIGKILL right after the checkpoint of step KILL_AT is on disk.
KILLER = Path(__file__).with_name("kill_after_checkpoint.py")


def _args(run_dir, **extra):
    args = [str(QUICKSTART), "--output", str(run_dir)]
    for key, value in {**COMMON, **extra}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def _run(args, killer=False):
    """(status, stdout, stderr) of a command line run to its end."""
    code = [str(KILLER)] if killer else ["-m", "kgreedy.train"]
    proc = subprocess.run([sys.executable, *code, *args], capture_output=True, text=True,
                          env={**ENV, "KILL_AT": str(KILL_AT)}, cwd=ROOT, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _killed_then_resumed(run_dir, **sets):
    killed = _run(_args(run_dir, **sets), killer=True)
    # What the kill left, before the resume writes over it.
    left = {"checkpoints": sorted(int(p.name[len("ckpt-"):-len(".index")]) for p in
                                  (run_dir / "checkpoints" / "stage3").glob("ckpt-*.index")),
            "summary": (json.loads((run_dir / "summary.json").read_text())
                        if (run_dir / "summary.json").exists() else None),
            "epochs": len(_records(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0}
    return killed, left, _run(_args(run_dir, **sets) + ["--resume"])


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Starts the command lines, each in its own process, two cores between them:
    an unbroken run (exporting the ensemble), one killed then resumed, and one on two
    replicas. Yields {name: future}."""
    root = tmp_path_factory.mktemp("decoupled")
    quiet = {"export.enabled": False}
    pool = concurrent.futures.ThreadPoolExecutor(3)
    try:
        yield {"one": pool.submit(lambda: (root / "one", *_run(_args(
                   root / "one", **{"export.heads": "ensemble"})))),
               "killed": pool.submit(_killed_then_resumed, root / "killed", **quiet),
               "two": pool.submit(lambda: (root / "two", *_run(_args(
                   root / "two", **quiet, **{"distribute.strategy": "mirrored",
                                             "distribute.logical_cpus": 2}))))}
    finally:
        pool.shutdown(wait=True)


@pytest.fixture(scope="module", autouse=True)
def _launch_first(request):
    """When a test of this file needs the command lines, they start before its first
    test, and run while the in-process tests do."""
    if any(item.module is request.module and "runs" in item.fixturenames
           for item in request.session.items):
        request.getfixturevalue("launched")


@pytest.fixture(scope="module")
def runs(launched):
    """{name: (run_dir, status, stdout, stderr)} of the finished runs, and "left":
    what the killed run left behind."""
    results = {name: launched[name].result() for name in ("one", "two")}
    killed, left, resumed = launched["killed"].result()
    run_dir = results["one"][0].parent / "killed"
    return {**results, "left": left, "killed": (run_dir, *killed),
            "resumed": (run_dir, *resumed)}


def _ok(runs, name):
    run_dir, status, out, err = runs[name]
    assert status == 0, f"{name}: {out[-1500:]}{err[-3000:]}"
    return run_dir, out


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir):
    """Every variable of the newest checkpoint of stage 3 (the decoupled stage)."""
    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "stage3"))
    reader = tf.train.load_checkpoint(path)
    return path, {name: reader.get_tensor(name)
                  for name in reader.get_variable_to_shape_map()
                  if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _tensorboard(run_dir):
    """{tag: {step: value}} of the run's TensorBoard scalars."""
    scalars = {}
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") \
                    else value.simple_value
                scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


@pytest.mark.slow
def test_a_decoupled_run_records_every_module_and_exports_the_ensemble(runs):
    run_dir, out = _ok(runs, "one")
    records = _records(run_dir)
    assert [(r["stage"], r["epoch"]) for r in records] == [(3, 1), (3, 2)]
    for r in records:
        for key in ("train_module_loss", "train_module_accuracy", "val_module_loss",
                    "val_module_accuracy"):
            assert len(r[key]) == 3 and all(math.isfinite(v) for v in r[key]), key
        for key in ("train_module_accuracy", "val_module_accuracy"):
            assert all(0 <= v <= 1 for v in r[key]), (key, r[key])
        assert all(v > 0 for v in r["train_module_loss"] + r["val_module_loss"])
        # The scalars are the last head's.
        assert r["val_module_accuracy"][-1] == r["val_accuracy"]
        assert r["val_module_loss"][-1] == r["val_loss"]
        assert r["train_module_accuracy"][-1] == r["train_accuracy"]
        assert r["train_module_loss"][-1] == r["train_loss"]

    scalars = _tensorboard(run_dir)
    for j in (1, 2, 3):
        for kind in ("train", "val"):
            for what in ("loss", "accuracy"):
                tag = f"module{j}/{kind}_{what}"
                assert tag in scalars, (tag, sorted(scalars))
                expected = {r["epoch"]: r[f"{kind}_module_{what}"][j - 1] for r in records}
                assert scalars[tag].keys() == expected.keys(), tag
                for epoch, value in expected.items():
                    assert scalars[tag][epoch] == pytest.approx(value, rel=1e-6), tag

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [3]
    final = summary["final"]
    assert final["stage"] == 3 and final["export_heads"] == "ensemble"
    # The heads scored after training are the last epoch's per-module figures.
    assert final["head_val_accuracies"] == pytest.approx(
        records[-1]["val_module_accuracy"], abs=1e-9)
    assert 0 <= final["ensemble_val_accuracy"] <= 1
    export = Path(final["export_path"])
    assert export.is_dir() and (export / "saved_model.pb").is_file()
    assert export.parent == run_dir / "export" / "quickstart"

    module_lines = [line for line in out.splitlines() if "modules 1..3:" in line]
    assert len(module_lines) == 2, out
    assert all(line.startswith("    modules 1..3: train acc ") and " | val acc " in line
               and line.count(" / ") == 4 for line in module_lines), module_lines


@pytest.mark.slow
def test_a_decoupled_run_killed_mid_epoch_resumes_bit_for_bit(runs):
    run_dir, status, _, err = runs["killed"]
    assert status == -signal.SIGKILL, err[-3000:]
    # Killed inside the one stage, in epoch 2, right after the checkpoint of step 8:
    # no stage finished, epoch 1's record is out.
    left = runs["left"]
    assert left["checkpoints"] == [KILL_AT - 2, KILL_AT], left
    assert left["summary"] is None or not left["summary"]["stages"], left
    assert left["epochs"] == 1
    _, out = _ok(runs, "resumed")
    assert f"stage 3: resuming at epoch 2, step {KILL_AT - STEPS} of {STEPS}" in out, out
    reference_dir, _ = _ok(runs, "one")
    path, resumed = _checkpoint(run_dir)
    reference_path, unbroken = _checkpoint(reference_dir)
    assert path.endswith(f"ckpt-{2 * STEPS}") and reference_path.endswith(f"ckpt-{2 * STEPS}")
    assert resumed.keys() == unbroken.keys()
    # Every module, head, module optimizer and replay buffer is in the checkpoint.
    for prefix in ("blocks/2/", "heads/2/", "optimizers/2/", "buffers/0/", "buffers/1/"):
        assert any(k.startswith(prefix) for k in unbroken), (prefix, sorted(unbroken))
    assert not any(k.startswith("buffers/2/") for k in unbroken)
    for name, value in unbroken.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    # The records too, but for the clock and the memory peaks (neither is
    # deterministic); the resumed epoch records the rate of its first step, as the
    # unbroken run does (it once recorded the rate at step 8).
    timing = {"seconds", "images_per_second", "cpu_seconds", "wall_seconds",
              "peak_memory_mb", "gpu_peak_memory_mb", "cpu_tensor_peak_memory_mb"}
    assert ([{k: v for k, v in r.items() if k not in timing} for r in _records(run_dir)]
            == [{k: v for k, v in r.items() if k not in timing}
                for r in _records(reference_dir)])


@pytest.mark.slow
def test_two_replicas_train_decoupled_with_a_buffer_as_one(runs):
    two_dir, _ = _ok(runs, "two")
    one_dir, _ = _ok(runs, "one")
    records = _records(two_dir)
    assert len(records) == 2
    for r in records:
        assert len(r["val_module_accuracy"]) == 3
        assert all(math.isfinite(v) for v in r["val_module_accuracy"] + r["val_module_loss"])
    _, two = _checkpoint(two_dir)
    _, one = _checkpoint(one_dir)
    # Synchronised BN and the all-gathered buffers: the replicas compute the global
    # batch's step, up to the order of float sums.
    weights = [k for k in one if k.startswith(("blocks/", "heads/", "buffers/"))
               and "OPTIMIZER_SLOT" not in k]
    assert len(weights) > 40
    for name in weights:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=2e-5, err_msg=name)
    # Not bit for bit: two replicas sum in another order (one device would not).
    assert any(not np.array_equal(two[k], one[k]) for k in weights), \
        "the mirrored run computed exactly what one device does: did it run two replicas?"
    np.testing.assert_allclose([r["val_module_accuracy"] for r in records],
                               [r["val_module_accuracy"] for r in _records(one_dir)],
                               atol=1.5 / 360)

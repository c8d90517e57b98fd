"""The Python API (kgreedy.split, kgreedy.fit, SplitNet.export; docs/python-api.md):
the README's example runs as written and its export passes the serving check; history,
callbacks, end-to-end fits, run directories and resume; bad arguments are ValueErrors
raised before any work."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import kgreedy
from kgreedy import fitting
from kgreedy.base.errors import NonFiniteLoss

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
CHECK_SERVING = str(ROOT / "tools" / "check_serving.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def readme_example():
    """The README's one Python code block, as written."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text("utf-8"),
                        re.S | re.M)
    assert len(blocks) == 1, "README.md should hold one Python example"
    return blocks[0]


def digits(count, start=0, batch=16):
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8, 1).astype("float32")[start:start + count]
    return tf.data.Dataset.from_tensor_slices((x, y[start:start + count])).batch(batch)


def tiny_model(name="tiny"):
    """Conv, then two conv-BN blocks with skip connections (split points res1, res2)."""
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    for block in ("res1", "res2"):
        r = keras.layers.BatchNormalization(name=f"{block}_bn")(
            keras.layers.Conv2D(8, 3, padding="same", name=f"{block}_conv")(h))
        h = keras.layers.ReLU(name=block)(keras.layers.Add(name=f"{block}_add")([h, r]))
    return keras.Model(inputs, h, name=name)


def tiny_net(**kwargs):
    keras.utils.set_random_seed(0)
    return kgreedy.split(tiny_model(), **{"at": ["res1"], "num_classes": 10,
                                          "head": kgreedy.heads.Conv(k=1, width=8),
                                          "mean": 5.0, "std": 6.0, **kwargs})


# ------------------------------------------------------------- README ----

@pytest.mark.slow
def test_readme_example_trains_and_its_export_passes_the_serving_check(tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102
    # The example sets a BN momentum its 90-step stages can settle (Keras' 0.99 gave
    # 0.87 / 0.81 / 0.83 at the three stages, 0.9 about 0.94 each), so no warning.
    assert not [w for w in caught if "momentum" in str(w.message)], caught
    history = namespace["history"]
    assert sorted(history.stages) == [1, 2, 3]
    assert len(history.stages[3]["val_accuracy"]) == 3
    assert history.summary["final"]["val_accuracy"] > 0.85
    export = tmp_path / "exports" / "digits" / "1"
    proc = subprocess.run([sys.executable, CHECK_SERVING, str(export)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].endswith("checks passed")


def test_importing_kgreedy_and_its_head_designs_loads_no_tensorflow():
    # The command lines filter TensorFlow's start-up lines before it loads
    # (kgreedy.quiet); kgreedy.split and kgreedy.fit load it on first use.
    code = ("import sys, kgreedy\n"
            "design = kgreedy.heads.Conv(k=2, width='auto')\n"
            "assert 'tensorflow' not in sys.modules, 'kgreedy.heads imported TF'\n"
            "assert 'keras' not in sys.modules, 'kgreedy.heads imported Keras'\n"
            "assert {'split', 'fit', 'heads'} <= set(dir(kgreedy))\n"
            "print(type(design).__name__, design.kind)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "HeadDesign conv", \
        proc.stderr[-2000:]


# ---------------------------------------------------------------- fit ----

class Recorder(keras.callbacks.Callback):
    """Records the hooks called; stops stage 1 after its first epoch."""

    def __init__(self):
        super().__init__()
        self.events, self.models = [], []

    def set_model(self, model):
        super().set_model(model)
        self.models.append(model.name)

    def on_train_begin(self, logs=None):
        self.events.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(("begin", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("end", epoch, sorted(logs)))
        if logs["stage"] == 1:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.events.append("train_end")


def test_fit_reports_like_keras_and_exports_the_serving_contract(tmp_path):
    net = tiny_net(batch_norm_momentum=0.5)  # settles in 2 steps: kgreedy.fit does not warn
    made, recorder = [], Recorder()

    def optimizer(stage):
        made.append(stage)
        return keras.optimizers.SGD(0.05, momentum=0.9)

    history = kgreedy.fit(net, digits(64), validation_data=digits(32, start=1500),
                          epochs_per_stage=2, steps_per_epoch=3, optimizer=optimizer,
                          callbacks=[recorder], verbose=0)
    assert made == [1, 2]  # a new optimizer per stage
    # Stage 1 stopped after one epoch (stop_training); epochs count over the fit.
    assert history.epoch == [0, 2, 3]
    assert history.history["stage"] == [1, 2, 2]
    assert history.history["learning_rate"] == pytest.approx([0.05] * 3)
    assert set(history.stages) == {1, 2}
    assert len(history.stages[2]["val_accuracy"]) == 2
    assert "stage" not in history.stages[2]
    # The host's peak memory since the stage began; a GPU's only where there is one.
    keys = sorted(["accuracy", "learning_rate", "loss", "stage", "val_accuracy", "val_loss",
                   "peak_memory_mb",
                   *(["gpu_peak_memory_mb"] if tf.config.list_logical_devices("GPU") else [])])
    assert recorder.events == ["train_begin", ("begin", 0), ("end", 0, keys), ("begin", 2),
                               ("end", 2, keys), ("begin", 3), ("end", 3, keys),
                               "train_end"]
    assert recorder.models == ["tiny_stage1", "tiny_stage2"]
    assert all(mb > 0 for mb in history.history["peak_memory_mb"])
    assert len(history.stages[2]["peak_memory_mb"]) == 2
    final = history.summary["final"]
    assert [e["epochs"] for e in history.summary["stages"]] == [1, 2]
    # Each stage's peak is the largest of its epochs' (and of its end, after them).
    for entry in history.summary["stages"]:
        assert entry["peak_memory_mb"] >= max(history.stages[entry["stage"]]["peak_memory_mb"])
    assert len(final["head_val_accuracies"]) == 2 and final["export_path"] is None

    path = net.export(tmp_path / "exports" / "tiny" / "1")
    assert path == str((tmp_path / "exports" / "tiny" / "1").resolve())
    images = next(iter(digits(4, start=1500)))[0]
    served = tf.saved_model.load(path).signatures["serving_default"](images=images)
    expected = tf.nn.softmax(net.deployed_model()(images, training=False))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected.numpy(), atol=1e-5)
    assert served["class_names"].numpy()[0].decode() in [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="exists already"):
        net.export(path)


def test_end_to_end_fit_of_a_module_list_without_validation_data():
    keras.utils.set_random_seed(0)
    first = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="first")
    second = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="second")
    net = kgreedy.split([first, second], input_shape=(8, 8, 1), num_classes=10,
                        head=[kgreedy.heads.Linear(), kgreedy.heads.Conv(k=1, width=8)],
                        batch_norm_momentum=0.5)  # settles in the fit's 2 steps
    before = first.kernel.numpy().copy()
    history = kgreedy.fit(net, digits(64).repeat(), epochs_per_stage=1, steps_per_epoch=2,
                          mode="end_to_end", verbose=2)
    assert history.history["stage"] == [2]
    assert "val_loss" not in history.history
    assert history.summary["final"]["val_accuracy"] is None
    assert not np.array_equal(first.kernel.numpy(), before), "module 1 trains end to end"


def test_a_loss_that_is_not_finite_stops_the_fit_naming_where():
    keras.utils.set_random_seed(0)
    net = kgreedy.split([keras.layers.Conv2D(8, 3, padding="same", name="only")],
                        input_shape=(8, 8, 1), num_classes=10, head=[kgreedy.heads.Linear()])
    with pytest.raises(NonFiniteLoss, match=r"stage 1, epoch 1, step \d.*the optimizer's "
                                            "learning rate"):
        kgreedy.fit(net, digits(64), optimizer=lambda stage: keras.optimizers.SGD(1e30),
                    verbose=0)


# ---------------------------------------------------- run dir, resume ----

class Interrupt(Exception):
    pass


class InterruptInStage2(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if logs["stage"] == 2:
            raise Interrupt  # after the epoch's checkpoint


def test_run_dir_records_and_resume_continues_where_the_fit_stopped(tmp_path):
    run_dir = tmp_path / "run"
    args = dict(validation_data=digits(32, start=1500), epochs_per_stage=2,
                steps_per_epoch=2, run_dir=run_dir, verbose=0)
    settled = dict(batch_norm_momentum=0.5)  # in a stage's 4 steps: kgreedy.fit does not warn
    first = tiny_net(**settled)
    with pytest.raises(Interrupt):  # with the progress bar (verbose=1) on the way
        kgreedy.fit(first, digits(64), callbacks=[InterruptInStage2()],
                    **{**args, "verbose": 1})
    assert {"fit.json", "dataset.json", "metrics.jsonl", "summary.json", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()}
    assert not (run_dir / "recipe.json").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="not empty"):
        kgreedy.fit(tiny_net(**settled), digits(64), **args)

    second = tiny_net(**settled)
    history = kgreedy.fit(second, digits(64), resume=True, **args)
    assert history.history["stage"] == [2] and history.epoch == [3]
    np.testing.assert_array_equal(second.modules[0].weights[0].numpy(),
                                  first.modules[0].weights[0].numpy())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [e["stage"] for e in summary["stages"]] == [1, 2] and summary["final"]

    third = tiny_net(**settled)  # a finished fit: nothing to train, the weights come back
    assert kgreedy.fit(third, digits(64), resume=True, **args).history == {}
    for mine, trained in zip(third.heads[1].weights, second.heads[1].weights):
        np.testing.assert_array_equal(mine.numpy(), trained.numpy())
    with pytest.raises(ValueError, match="epochs_per_stage"):
        kgreedy.fit(tiny_net(**settled), digits(64), resume=True,
                    **{**args, "epochs_per_stage": 3})


# ------------------------------------------------------- bad arguments ----

@pytest.fixture(scope="module")
def net():
    # Momentum 0 settles in one step: the fits below stop before training or train
    # one step per stage, and kgreedy.fit has no momentum to warn about.
    return tiny_net(batch_norm_momentum=0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"at": ["nope"]}, r"no layer of that name.*Received: at\[0\]='nope'"),
    ({"at": ["res1_conv"]}, r"not a split point: 'res1_add' reads 'stem'"),
    ({"at": ["res1"], "modules": 2}, r"exactly one of `at`.*Received: at=\['res1'\]"),
    ({"at": None}, "exactly one of `at`"),
    ({"at": "res1"}, "list of layer names"),
    ({"at": None, "modules": 9}, r"has \d+ split points, so at most"),
    ({"num_classes": 1}, r"`num_classes` must be an integer >= 2. Received: num_classes=1"),
    ({"head": [kgreedy.heads.Conv()]}, r"one head per stage \(2\)"),
    ({"head": keras.layers.Dense(3)}, "one stage: pass a list"),
    ({"head": "conv"}, r"design of kgreedy.heads.*Received: head='conv'"),
    ({"last_head": "model"}, "ends in a feature map"),
    ({"std": 0.0}, r"`std` must be > 0"),
    ({"mean": [1.0, 2.0]}, r"one per channel \(1\)"),
    ({"class_names": ["a", "b"]}, r"one name per class \(10\)"),
    ({"head": kgreedy.heads.Conv(pool_size=16)}, "smaller than its head's 16x16 pool"),
    ({"batch_norm_momentum": 1.0}, r"in \[0, 1\).*Received: batch_norm_momentum=1.0"),
    ({"batch_norm_momentum": float("nan")}, r"Received: batch_norm_momentum=nan"),
    ({"batch_norm_momentum": "0.9"}, r"Received: batch_norm_momentum='0.9'"),
])
def test_split_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_net(**kwargs)


def classifier(activation=None, units=10):
    inputs = keras.Input((8, 8, 1))
    h = tiny_model("trunk")(inputs)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inputs, keras.layers.Dense(units, activation=activation,
                                                  name="logits")(h), name="classifier")


def test_split_into_balanced_modules_keeping_the_models_own_classifier():
    inputs = keras.Input((8, 8, 1))
    h = tiny_model()(inputs)  # a nested model is one layer: no split point inside it
    flat = tiny_model("flat")
    top = keras.layers.Dense(10, name="logits")(keras.layers.GlobalAveragePooling2D()(
        flat.output))
    net = kgreedy.split(keras.Model(flat.input, top), modules=2, num_classes=10,
                        last_head="model", head=kgreedy.heads.MlpSr(width="auto"),
                        class_names=list("abcdefghij"))
    assert net.num_stages == 2 and net.heads[-1].name.endswith("_top")
    assert net.heads[0].name == "stage1_head"
    lines = []
    net.summary(print_fn=lines.append)
    assert lines[0].split() == ["stage", "output", "trainable", "frozen", "deployed", "module"]
    assert len(lines) == 4 and lines[-1].startswith("deployed model (trunk + stage 2 head)")
    assert net.spec.class_names[:2] == ("a", "b")
    with pytest.raises(ValueError, match="applies softmax"):
        kgreedy.split(classifier("softmax"), at=["trunk"], num_classes=10, last_head="model")
    with pytest.raises(ValueError, match="has 3 outputs and the task 10 classes"):
        kgreedy.split(classifier(units=3), at=["trunk"], num_classes=10, last_head="model")
    with pytest.raises(ValueError, match=r"has 0 split points.*Received: modules=2"):
        kgreedy.split(keras.Model(inputs, h), modules=2, num_classes=10)


def test_split_refuses_what_is_not_a_model_and_designs_check_themselves():
    with pytest.raises(ValueError, match=r"keras.Model or a list.*Received: model='x'"):
        kgreedy.split("x", num_classes=10)
    with pytest.raises(ValueError, match=r"fixed image shape"):
        kgreedy.split([keras.layers.Conv2D(4, 3)], input_shape=(None, None, 3),
                      num_classes=10)
    with pytest.raises(ValueError, match=r"Received: k=0"):
        kgreedy.heads.Conv(k=0)
    with pytest.raises(ValueError, match=r"'auto'.*Received: width='wide'"):
        kgreedy.heads.MlpSr(width="wide")


def unbatched():
    return tf.data.Dataset.from_tensor_slices((np.zeros([4, 8, 8, 1]), np.zeros([4])))


@pytest.mark.parametrize("train, kwargs, message", [
    (np.zeros([4, 8, 8, 1]), {}, r"tf.data.Dataset of \(images, labels\).*Received: train_ds="),
    (unbatched(), {}, r"batch it"),
    (unbatched().map(lambda x, y: x).batch(2), {}, r"\(images, labels\) pairs"),
    (unbatched().map(lambda x, y: (tf.image.resize(x, [9, 9]), y)).batch(2), {},
     r"shape \(None, 9, 9, 1\); the net takes \(8, 8, 1\)"),
    (unbatched().batch(2), {}, r"integer class ids.*dtype float64"),
    (digits(8).filter(lambda x, y: True), {}, r"unknown length.*steps_per_epoch"),
    (digits(8).repeat(), {}, r"infinite length"),
    (digits(8).take(0), {}, "yields no batch"),
    (digits(32), {"steps_per_epoch": 3}, r"yields 2 batches per pass"),
    (digits(32), {"validation_data": digits(8).repeat()}, "`validation_data` is infinite"),
    (digits(32), {"epochs_per_stage": 0}, r"Received: epochs_per_stage=0"),
    (digits(32), {"optimizer": keras.optimizers.SGD(0.1)}, "function of the stage"),
    (digits(32), {"optimizer": keras.optimizers.SGD}, "function of the stage"),
    (digits(32), {"mode": "layerwise"}, r"Received: mode='layerwise'"),
    (digits(32), {"callbacks": [print]}, "keras.callbacks.Callback"),
    (digits(32), {"resume": True}, r"pass run_dir. Received: run_dir=None"),
    (digits(32), {"verbose": 3}, r"Received: verbose=3"),
])
def test_fit_refuses_bad_arguments_before_any_work(net, train, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kgreedy.fit(net, train, **kwargs)


def test_fit_warns_when_a_stage_is_too_short_for_batch_norm_momentum(tmp_path):
    """Issue 25, defect 13: Keras' default momentum 0.99 needs about 100 steps to
    settle BN's moving statistics; a stage of 3 epochs of 22 steps is warned about,
    naming the layer, its momentum, the steps and the fix, before any work (the fit
    below then stops on its non-empty run_dir)."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    args = dict(epochs_per_stage=3, steps_per_epoch=22, run_dir=tmp_path / "full")
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(ValueError, match="not empty"):
            kgreedy.fit(tiny_net(), digits(64).repeat(), **args)
    messages = [str(w.message) for w in caught if "kgreedy.fit" in str(w.message)]
    assert len(messages) == 2, messages  # one per stage: res1_bn, then res2_bn
    assert messages[0].startswith("kgreedy.fit: stage 1 trains 66 steps (3 epochs of "
                                  "22), fewer than the 100 that BatchNormalization "
                                  "momentum 0.99 needs")
    assert "'res1_bn' in module 1" in messages[0] and "'res2_bn' in module 2" in messages[1]
    assert "batch_norm_momentum=0.9 to kgreedy.split" in messages[0]
    assert caught[0].filename == __file__  # points at the caller's kgreedy.fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.9 settles in about 10 steps: no warning
        with pytest.raises(ValueError, match="not empty"):
            kgreedy.fit(tiny_net(batch_norm_momentum=0.9), digits(64).repeat(), **args)


def test_split_batch_norm_momentum_sets_every_batch_norm_of_the_net():
    model = tiny_model()
    net = kgreedy.split(model, at=["res1"], num_classes=10, batch_norm_momentum=0.9,
                        head=[kgreedy.heads.Conv(k=2, width=8),
                              keras.Sequential([keras.layers.BatchNormalization(),
                                                keras.layers.GlobalAveragePooling2D(),
                                                keras.layers.Dense(10)])])
    in_model = [layer.momentum for layer in model.layers
                if isinstance(layer, keras.layers.BatchNormalization)]
    assert in_model == [0.9, 0.9]  # the model's own layers: it keeps them
    in_heads = [bn.momentum for head in net.heads for bn in fitting.batch_norms(head)]
    assert len(in_heads) == 3 and set(in_heads) == {0.9}
    assert fitting.check_batch_norm(net, 1, 10) == []
    kept = kgreedy.split(tiny_model(), at=["res1"], num_classes=10)
    assert {bn.momentum for m in kept.modules for bn in fitting.batch_norms(m)} == {0.99}
    # End to end trains only the last head; every module still trains (in all).
    warned = fitting.check_batch_norm(kept, 1, 10, mode="end_to_end")
    assert [m.split(" trains")[0] for m in warned] == ["kgreedy.fit: module 1",
                                                        "kgreedy.fit: module 2"]


def test_fit_json_is_read_strictly_on_resume(tmp_path):
    """fit.json goes through the one strict JSON reader (issue 25, defect 10)."""
    from kgreedy.base.errors import KgreedyError
    from kgreedy.training import run
    from kgreedy.training.rundir import RunDir

    (tmp_path / "fit.json").write_text('{"mean": [NaN]}')
    with pytest.raises(KgreedyError, match=r"fit.json: .*mean\[0\]: NaN is not a JSON "
                                           "number"):
        run.compare_record(RunDir(str(tmp_path)).path(RunDir.FIT), {"mean": [0.0]})


def test_a_fit_checks_its_run_dir_again_under_the_lock(net, tmp_path, monkeypatch):
    """Two fits on one new run_dir both pass the first check; the one that locks
    second must find the other's files and stop, not train into that run."""
    from kgreedy.training.runlock import RunLock

    run_dir = tmp_path / "run"
    acquire = RunLock.acquire

    def other_fit_first(lock):
        os.makedirs(lock.run_dir, exist_ok=True)  # the other fit, done meanwhile
        (Path(lock.run_dir) / "summary.json").write_text("{}")
        return acquire(lock)

    monkeypatch.setattr(RunLock, "acquire", other_fit_first)
    with pytest.raises(ValueError, match=r"not empty.*Received: run_dir="):
        kgreedy.fit(net, digits(32), epochs_per_stage=1, steps_per_epoch=1,
                    run_dir=run_dir, verbose=0)
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]  # lock released


def test_fit_and_export_refuse_bad_targets(net, tmp_path):
    with pytest.raises(ValueError, match="what kgreedy.split returned"):
        kgreedy.fit(tiny_model(), digits(32))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(ValueError, match=r"not empty.*Received: run_dir="):
        kgreedy.fit(net, digits(32), run_dir=tmp_path / "full")
    with pytest.raises(ValueError, match=r"`resume=True` needs an existing run directory "
                                         r"with fit.json"):
        kgreedy.fit(net, digits(32), run_dir=tmp_path / "full", resume=True)
    with pytest.raises(ValueError, match=r"version directory.*Received: path='exports/x'"):
        net.export("exports/x")
    with pytest.raises(ValueError, match=r"Received: heads='all'"):
        net.export(tmp_path / "m" / "1", heads="all")
    with pytest.raises(ValueError, match=r"between 1 and 2. Received: stage=3"):
        net.export(tmp_path / "m" / "1", stage=3)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build([tf.Variable(1.0)])  # used before, as by a previous stage
    with pytest.raises(ValueError, match=r"new optimizer for every stage"):
        kgreedy.fit(net, digits(32), optimizer=lambda stage: optimizer, verbose=0)


def test_the_head_ensemble_of_a_split_net_is_scored_and_exported(tmp_path):
    """Every head of a split net is scored in one pass, and `heads="ensemble"`
    serves the paper's weighted ensemble of the modules' heads."""
    from kgreedy.model.ensemble import evaluate_heads
    from kgreedy.model.network import ensemble_logits

    net = tiny_net(at=["res1_add", "res1"])  # a module that is one ReLU: still a module
    scores = evaluate_heads(net, digits(32, start=1500))
    assert len(scores["head_val_accuracies"]) == 3 and scores["val_examples"] == 32
    images = next(iter(digits(4, start=1500)))[0]
    expected = ensemble_logits([net.deployed_model(j)(images, training=False)
                                for j in (1, 2, 3)])
    path = net.export(tmp_path / "ens" / "1", heads="ensemble")
    served = tf.saved_model.load(path).signatures["serving_default"](images=images)
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               tf.nn.softmax(expected).numpy(), atol=1e-5)
    last = tf.nn.softmax(net.deployed_model()(images, training=False)).numpy()
    assert np.abs(served["probabilities"].numpy() - last).max() > 1e-4


def test_a_fit_run_directory_exports_from_the_command_line(tmp_path, capsys):
    """kgreedy.fit writes net.json beside fit.json: `python -m kgreedy.export RUN_DIR`
    rebuilds the net from it, restores the last stage and serves what the fitted net
    computes; a probe, which needs the run's data source, is refused in one line."""
    from kgreedy import cli, export, probe

    net = tiny_net(batch_norm_momentum=0.5)
    run_dir = tmp_path / "fit"
    kgreedy.fit(net, digits(64), epochs_per_stage=2, run_dir=run_dir, verbose=0)
    assert json.loads((run_dir / "net.json").read_text())["image_shape"] == [8, 8, 1]
    capsys.readouterr()
    assert cli.run(export.main, [str(run_dir)]) == 0
    version = capsys.readouterr().out.strip()
    assert version == str(run_dir / "export" / net.name / "1")
    x = np.asarray(next(iter(digits(16)))[0])
    served = tf.saved_model.load(version).signatures["serving_default"](
        images=tf.constant(x))["probabilities"].numpy()
    expected = tf.nn.softmax(net.deployed_model(2)(x, training=False)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
    with pytest.raises(SystemExit) as caught:
        cli.run(probe.main, [str(run_dir)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a kgreedy.fit run: it records no data source" in err

"""`export.heads: early_exit`: the SavedModel, its signatures in a process without
Keras or kgreedy, the run's calibration and the command line's export."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from kgreedy import cli, report, train
from kgreedy import export as export_cli
from kgreedy.base.errors import KgreedyError
from kgreedy.serving import export
from test_export import CLEAN_LOADER, ENV, REPO
from tiny_nets import trained_net

RECIPE = {"name": "t", "model": {"blocks": [{"width": 8}, {"width": 16, "downsample": "psi"},
                                            {"width": 16}]},
          "aux": {"k": 2, "width": 8}}
QUICKSTART = f"{REPO}/recipes/quickstart.json"

# test_export's loader: keras and kgreedy unimportable, as in a serving image.
LOADER = CLEAN_LOADER.split("model_dir, images_path")[0] + textwrap.dedent("""
    model_dir, images_path, out_path = sys.argv[1:4]
    loaded = tf.saved_model.load(model_dir)
    x = np.load(images_path)
    pngs = tf.stack([tf.io.encode_png(tf.cast(image, tf.uint8)) for image in x])
    answers = {"default": loaded.signatures["serving_default"](images=tf.constant(x)),
               "encoded": loaded.signatures["serve_encoded"](image_bytes=pngs)}
    for value in (0.0, 1.0):
        t = tf.constant([value] * 3)
        answers[f"pixels {value}"] = loaded.signatures["serving_thresholds"](
            images=tf.constant(x), thresholds=t)
        answers[f"files {value}"] = loaded.signatures["serve_encoded_thresholds"](
            image_bytes=pngs, thresholds=t)
    with open(out_path, "w") as f:
        json.dump({key: {k: v.numpy().tolist() for k, v in out.items() if k != "class_names"}
                   for key, out in answers.items()}, f)
""")


@pytest.fixture(scope="module")
def trained():
    _, spec, net, x = trained_net(RECIPE, epochs=1)
    return spec, net, x


def test_the_export_answers_with_exit_stages_in_a_process_without_kgreedy(trained, tmp_path):
    spec, net, x = trained
    x = x[:64]
    confident = tf.reduce_max(tf.nn.softmax(net.deployed_model(1)(x)), -1).numpy()
    thresholds = [float(np.median(confident)), 0.0, 1.0]  # half leave at 1, half at 2
    path = export.export_saved_model(net, spec, str(tmp_path / "m"), heads="early_exit",
                                     thresholds=thresholds)
    plain = [export.export_saved_model(net, spec, str(tmp_path / f"h{j}"), stage=j)
             for j in (1, 3)]
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", LOADER, path, str(tmp_path / "x.npy"),
                           str(tmp_path / "out.json")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    heads = [tf.saved_model.load(p).signatures["serving_default"](images=tf.constant(x))
             for p in plain]
    stages = np.array(got["default"]["exit_stage"])
    assert set(stages) == {1, 2} and got["encoded"]["exit_stage"] == stages.tolist()
    np.testing.assert_array_equal(stages, np.where(confident >= thresholds[0], 1, 2))
    # Thresholds of 1: the last head's answers bit for bit; of 0: head 1's.
    for key, head, stage in (("1.0", heads[1], 3), ("0.0", heads[0], 1)):
        for kind in ("pixels", "files"):
            answer = got[f"{kind} {key}"]
            assert answer["exit_stage"] == [stage] * len(x)
            np.testing.assert_array_equal(answer["probabilities"],
                                          head["probabilities"].numpy())
            assert answer["class_ids"] == head["class_ids"].numpy().tolist()


def test_thresholds_out_of_range_are_refused_by_the_signature(trained, tmp_path):
    spec, net, x = trained
    path = export.export_saved_model(net, spec, str(tmp_path / "m"), heads="early_exit",
                                     thresholds=[0.5, 0.5, 1.0])
    signature = tf.saved_model.load(path).signatures["serving_thresholds"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="thresholds: each must be"):
        signature(images=tf.constant(x[:2]), thresholds=tf.constant([0.5, 1.5, 1.0]))


@pytest.mark.parametrize("kwargs, argument", [
    ({"heads": "early_exit"}, "thresholds"),
    ({"heads": "early_exit", "thresholds": [0.5, 0.5]}, "thresholds"),
    ({"heads": "early_exit", "thresholds": [0.5, float("nan"), 1]}, "thresholds"),
    ({"heads": "last", "thresholds": [0.5, 0.5, 1]}, "thresholds"),
])
def test_bad_thresholds_write_nothing(trained, tmp_path, kwargs, argument):
    spec, net, _ = trained
    with pytest.raises(KgreedyError, match=argument):
        export.export_saved_model(net, spec, str(tmp_path / "m"), **kwargs)
    assert not (tmp_path / "m").exists()


def test_a_run_calibrates_records_and_exports_its_exits(tmp_path, capsys):
    output = tmp_path / "run"
    assert cli.run(train.main, [QUICKSTART, "--output", str(output), "--set",
                                "export.heads=early_exit", "--set",
                                "train.epochs_per_stage=1", "--set",
                                "export.early_exit.max_accuracy_drop=2"]) == 0
    out = capsys.readouterr().out
    assert "calibrating the early exits on the evaluation split" in out
    assert "held-out eval examples" in out
    final = json.loads((output / "summary.json").read_text())["final"]
    plan = final["early_exit"]
    assert final["export_heads"] == "early_exit" and plan["max_accuracy_drop"] == 2
    assert len(plan["thresholds"]) == 3 and plan["thresholds"][-1] == 1.0
    assert plan["exit_mflops"] == sorted(plan["exit_mflops"])
    assert plan["full_mflops"] == plan["exit_mflops"][-1] > 0
    fit, held = plan["calibration"], plan["held_out"]
    # The digits' 360 eval examples: 180 fit the thresholds, the other 180 score them.
    assert fit["examples"] == held["examples"] == 180
    assert fit["accuracy"] >= fit["last_head_accuracy"] - 0.02
    assert sum(held["exits"]) == pytest.approx(1.0)
    assert plan["exit_mflops"][0] <= held["mean_mflops"] <= plan["full_mflops"]
    assert plan["curve"] and all(p["mean_mflops"] > 0 for p in plan["curve"])
    assets = json.loads((output / "export" / "quickstart" / "1" / "assets.extra" /
                         "early_exit.json").read_text())
    assert assets == plan
    # The command line's export of the same run calibrates the same way.
    assert cli.run(export_cli.main, [str(output), "--heads", "early_exit"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("/export/quickstart/2")
    assert "held-out eval examples" in err
    # The report draws the exits' accuracy against compute and states the served ones.
    assert cli.run(report.main, [str(output)]) == 0
    text = (output / "report" / "report.md").read_text()
    assert "**Early exits** at thresholds" in text and "(exits.png)" in text
    assert (output / "report" / "exits.png").stat().st_size > 1000
    # The benchmark against a plain export of the same run, on a few eval images.
    assert cli.run(export_cli.main, [str(output), "--heads", "last"]) == 0
    capsys.readouterr()
    proc = subprocess.run(
        [sys.executable, f"{REPO}/tools/benchmark_exits.py", str(output), "--plain", "3",
         "--exits", "1", "--images", "70", "--latency-images", "3", "--repeats", "1",
         "--json", str(tmp_path / "bench.json")],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["images"] == 70 and bench["latency_images"] == 3
    assert bench["batch1_latency_ratio"] == pytest.approx(
        bench["early_exit"]["batch1_median_ms"] / bench["plain"]["batch1_median_ms"])
    assert sum(bench["early_exit"]["exits"]) == pytest.approx(1.0)
    assert len(bench["early_exit"]["exits"]) == 3 and "exits" not in bench["plain"]
    assert "early exit / plain: batch 1 latency" in proc.stdout
    # A version that is not an early-exit export is refused in one line.
    proc = subprocess.run(
        [sys.executable, f"{REPO}/tools/benchmark_exits.py", str(output), "--plain", "3",
         "--exits", "3", "--images", "8"], env=ENV, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2 and "not an early-exit export" in proc.stderr


@pytest.mark.parametrize("setting, message", [
    ("train.mode=end_to_end", "'early_exit' needs train.mode 'greedy' or 'decoupled'"),
    ('model.blocks=[{"width": 8}]', "'early_exit' needs at least 2 stages"),
])
def test_a_run_without_earlier_heads_cannot_export_early_exits(tmp_path, capsys, setting,
                                                                message):
    with pytest.raises(SystemExit) as info:
        cli.run(train.main, [QUICKSTART, "--output", str(tmp_path / "r"), "--set",
                             "export.heads=early_exit", "--set", setting])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()

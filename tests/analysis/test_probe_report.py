"""kgreedy.probe (layer-wise linear probes) and kgreedy.report (plots and report.md)
on a one-epoch-per-stage quickstart run; kgreedy.probe --data on a kgreedy.fit run
(fit.json and net.json, no recorded data source) and on the quickstart run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kgreedy import cli, probe, report
from kgreedy.analysis.report import PLOTS

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "kgreedy.train", str(ROOT / "recipes" / "quickstart.json"),
         "--output", str(out), "--set", "train.epochs_per_stage=1",
         "--set", "export.enabled=false"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def probed(run_dir):
    """The run after `python -m kgreedy.probe RUN_DIR` with default options."""
    stdout = _main_ok(probe.main, [str(run_dir)])
    return run_dir, json.loads((run_dir / "probes.json").read_text()), stdout


def _main_ok(main, argv):
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.run(main, argv) == 0
    return buffer.getvalue()


def _usage_error(main, argv, capsys):
    """Runs `main` in-process, expecting exit status 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        cli.run(main, argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kgreedy: error: ") and err.count("\n") == 1, err
    return err


def _is_png(path):
    return path.is_file() and path.stat().st_size > len(PNG_MAGIC) \
        and path.read_bytes()[:8] == PNG_MAGIC


def _copy(run_dir, tmp_path, drop=()):
    """A copy of the trained run without what probe and report wrote into it."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy,
                    ignore=shutil.ignore_patterns("report", "probes.json", "probes.png"))
    for name in drop:
        (copy / name).unlink()
    return copy


def test_the_quickstart_records_its_peak_memory_per_epoch_and_stage(run_dir):
    records = [json.loads(line) for line in
               (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert len(records) == len(stages) == 3
    for record, stage in zip(records, stages):  # one epoch per stage
        assert record["peak_memory_mb"] > 100, record  # TensorFlow alone holds more
        assert stage["peak_memory_mb"] >= record["peak_memory_mb"], (stage, record)
        assert stage["peak_memory_since"] == "stage"
        # None without a GPU; on one, TensorFlow's peak there.
        assert (record["gpu_peak_memory_mb"] is None) == (stage["gpu_peak_memory_mb"] is None)


def test_probe_measures_every_block_and_writes_json_and_png(probed):
    run_dir, result, stdout = probed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["recipe"] == "quickstart" and result["mode"] == "greedy"
    assert result["run"] == str(run_dir)
    # Digits: 1,437 train and 360 eval examples, all below the default bounds.
    assert (result["train_examples"], result["eval_examples"]) == (1437, 360)
    assert result["pooled_to"] == [2, 2]
    blocks = result["blocks"]
    assert [b["block"] for b in blocks] == [1, 2, 3]
    for b, stage in zip(blocks, summary["stages"]):
        assert b["output_shape"] == stage["output_shape"]
        assert b["features"] == 4 * b["output_shape"][2]  # pooled to 2x2
        assert b["head_val_accuracy"] == stage["val_accuracy"]
        for key in ("probe_train_accuracy", "probe_eval_accuracy"):
            assert 0.0 <= b[key] <= 1.0
        assert b["seconds"] >= 0
    # Ten classes: chance is 0.1. The first block's pooled features separate the
    # digits almost perfectly (measured 0.99 after one epoch per stage).
    assert blocks[0]["probe_eval_accuracy"] > 0.8
    assert all(b["probe_eval_accuracy"] > 0.5 for b in blocks)
    assert result["ensemble_val_accuracy"] == summary["final"].get("ensemble_val_accuracy")
    assert _is_png(run_dir / "probes.png")
    assert not [p for p in os.listdir(run_dir) if p.startswith(".tmp-")]
    assert "probe eval" in stdout and stdout.count("block 1/3") == 1


@pytest.mark.slow
def test_probe_bounds_the_samples_and_the_depth(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    # An end-to-end run's summary has one stage entry, for the last stage, and no
    # scores of the untrained heads.
    summary = json.loads((copy / "summary.json").read_text())
    summary["stages"] = summary["stages"][-1:]
    summary["final"]["head_val_accuracies"] = None
    (copy / "summary.json").write_text(json.dumps(summary))
    _main_ok(probe.main, [str(copy), "--max-train", "300", "--max-eval", "50",
                          "--stage", "2", "--seed", "3"])
    result = json.loads((copy / "probes.json").read_text())
    assert (result["train_examples"], result["eval_examples"]) == (300, 50)
    assert [b["block"] for b in result["blocks"]] == [1, 2]
    assert [b["head_val_accuracy"] for b in result["blocks"]] == [None, None]
    assert _is_png(copy / "probes.png")


@pytest.mark.slow
@pytest.mark.parametrize("argv, needle", [
    (["--max-train", "0"], "--max-train"),
    (["--max-eval", "-5"], "--max-eval"),
    (["--max-train", "1"], "--max-train: the train sample holds a single class"),
    (["--stage", "4"], "--stage: must be between 1 and 3"),
    (["--stage", "0"], "--stage"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to 4294967295; received '-1'"),
    (["--seed", "4294967296"], "--seed: must be an integer from 0 to 4294967295"),
])
def test_probe_usage_errors_write_nothing(run_dir, tmp_path, capsys, argv, needle):
    copy = _copy(run_dir, tmp_path)
    before = sorted(os.listdir(copy))
    assert needle in _usage_error(probe.main, [str(copy), *argv], capsys)
    assert sorted(os.listdir(copy)) == before


@pytest.mark.slow
def test_probe_cli_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kgreedy.probe", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kgreedy")]
    assert lines == [f"kgreedy: error: RUN_DIR: not a kgreedy run directory: "
                     f"{tmp_path / 'recipe.json'} is missing; received '{tmp_path}'"]
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------- --data ----

QUICKSTART = str(ROOT / "recipes" / "quickstart.json")


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """A kgreedy.fit run directory: a small conv model split into two modules, two
    epochs per stage on 512 embedded digits (8x8x1, 10 classes) from a tf.data
    pipeline, which the run cannot record."""
    import keras
    import tensorflow as tf
    from sklearn.datasets import load_digits

    import kgreedy

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(h)
    net = kgreedy.split(keras.Model(inputs, h), at=["conv1"], num_classes=10,
                        head=kgreedy.heads.Conv(k=1, width=8), mean=4.9, std=6.0)
    x, y = load_digits(return_X_y=True)
    train = tf.data.Dataset.from_tensor_slices(
        (x[:512].reshape(-1, 8, 8, 1).astype("float32"), y[:512])).batch(32)
    run = tmp_path_factory.mktemp("fit") / "run"
    kgreedy.fit(net, train, epochs_per_stage=2, run_dir=run, verbose=0)
    assert (run / "fit.json").is_file() and not (run / "recipe.json").exists()
    return run


def _files(folder):
    """{name: bytes} of a folder's files: what a refused probe must leave as it was."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_fit_run_is_probed_on_the_data_of_a_recipe(fit_run):
    stdout = _main_ok(probe.main, [str(fit_run), "--data", QUICKSTART,
                                   "--max-train", "400", "--max-eval", "200"])
    result = json.loads((fit_run / "probes.json").read_text())
    assert (result["recipe"], result["mode"], result["unit"]) == (None, "greedy", "module")
    assert result["data"]["source"] == "digits" and result["data"]["eval_fraction"] == 0.2
    assert (result["train_examples"], result["eval_examples"]) == (400, 200)
    modules = result["blocks"]
    assert [m["block"] for m in modules] == [1, 2]
    assert [m["output_shape"] for m in modules] == [[8, 8, 16], [8, 8, 16]]
    for m in modules:
        assert m["features"] == 64  # 2x2 x 16 channels
        assert 0.0 <= m["probe_train_accuracy"] <= 1.0
        assert 0.0 <= m["probe_eval_accuracy"] <= 1.0
    assert modules[-1]["probe_eval_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert "module 2/2" in stdout and "probe eval" in stdout
    assert _is_png(fit_run / "probes.png")
    assert not [p for p in os.listdir(fit_run) if p.startswith(".tmp-")]


def test_a_data_section_alone_is_enough(fit_run, tmp_path):
    section = tmp_path / "digits.json"
    section.write_text(json.dumps({"source": "digits", "eval_fraction": 0.5}))
    _main_ok(probe.main, [str(fit_run), "--data", str(section), "--stage", "1",
                          "--max-train", "300", "--max-eval", "100"])
    result = json.loads((fit_run / "probes.json").read_text())
    assert result["data"]["eval_fraction"] == 0.5 and result["stage"] == 1
    assert [m["block"] for m in result["blocks"]] == [1]
    assert result["blocks"][0]["probe_eval_accuracy"] > 0.5


def test_a_fit_run_without_data_is_refused_naming_the_flag(fit_run, capsys):
    before = _files(fit_run)
    err = _usage_error(probe.main, [str(fit_run)], capsys)
    assert err.startswith("kgreedy: error: RUN_DIR: is a kgreedy.fit run: it records no "
                          "data source") and "--data DATA.json" in err
    assert _files(fit_run) == before


def _classes_folder(root, count):
    """An image folder of `count` classes, one 8x8 grey PNG each."""
    from PIL import Image

    for c in range(count):
        (root / f"class{c}").mkdir(parents=True)
        Image.new("L", (8, 8), 40 * c).save(root / f"class{c}" / "a.png")
    return root


@pytest.mark.parametrize("section, needle", [
    ({"source": "digits", "image_size": 16},
     "--data: gives 16x16x1 images of 10 classes, but the run's net takes 8x8x1 images "
     "of 10 classes ("),
    ({"source": "digits", "channels": 3}, "gives 8x8x3 images of 10 classes"),
    ({"source": "image_folder", "image_size": 8, "channels": 1, "data_dir": "{folder}"},
     "gives 8x8x1 images of 3 classes, but the run's net takes 8x8x1 images of 10"),
    ({"source": "digits", "colour": True}, "data.colour: unknown key; known keys are source,"),
    ({"source": "digits", "eval_fraction": 1.5}, "data.eval_fraction: must be < 1.0; "
                                                  "received 1.5"),
    ({"source": "image_folder", "image_size": 8}, "data.data_dir: is required when"),
    (["digits"], "--data: must hold a JSON object: a recipe, or a recipe's data section"),
])
def test_data_unlike_the_net_or_invalid_is_one_line(fit_run, tmp_path, capsys, section,
                                                    needle):
    if isinstance(section, dict) and section.get("data_dir") == "{folder}":
        section["data_dir"] = str(_classes_folder(tmp_path / "folder", 3))
    path = tmp_path / "data.json"
    path.write_text(json.dumps(section))
    before = _files(fit_run)
    err = _usage_error(probe.main, [str(fit_run), "--data", str(path)], capsys)
    assert needle in err, err
    if "run's net takes" in needle:  # names the net's file and the data file given
        assert f"({fit_run / 'net.json'}); " in err and err.rstrip().endswith(f"'{path}'")
    assert _files(fit_run) == before


def test_data_replaces_the_data_a_recipe_run_records(run_dir, tmp_path, capsys):
    """For a kgreedy.train run --data overrides the recorded data source (data that
    moved, another split); the net's input is checked against dataset.json."""
    copy = _copy(run_dir, tmp_path)
    section = tmp_path / "moved.json"
    section.write_text(json.dumps({"source": "digits", "eval_fraction": 0.5}))
    _main_ok(probe.main, [str(copy), "--data", str(section), "--stage", "1",
                          "--max-train", "300", "--max-eval", "500"])
    result = json.loads((copy / "probes.json").read_text())
    assert result["recipe"] == "quickstart" and result["data"]["eval_fraction"] == 0.5
    assert result["eval_examples"] == 500  # the recipe's 0.2 holds out 360
    section.write_text(json.dumps({"source": "digits", "image_size": 10}))
    err = _usage_error(probe.main, [str(copy), "--data", str(section)], capsys)
    assert f"but the run's net takes 8x8x1 images of 10 classes ({copy / 'dataset.json'})" \
        in err


def test_a_fit_run_is_reported_from_its_fit_json(fit_run, tmp_path):
    """A kgreedy.fit run has fit.json, not recipe.json: the report names its model,
    mode and modules, and tables its two stages."""
    out = tmp_path / "report"
    _main_ok(report.main, [str(fit_run), "--output", str(out)])
    text = (out / "report.md").read_text()
    name = json.loads((fit_run / "fit.json").read_text())["name"]
    assert text.startswith(f"# Run report: {name}\n")
    assert f"A kgreedy.fit run of the Keras model {name}, split into 2 modules." in text
    assert f"Mode: greedy; 2 modules of {name}; 4 epochs recorded." in text
    assert json.loads((fit_run / "summary.json").read_text())["final"]["stage"] == 2
    assert "**Final** (stage 2): val accuracy " in text  # none: fitted without validation
    assert _is_png(out / "accuracy.png") and _is_png(out / "depth.png")


def test_report_embeds_the_plots_that_exist(probed):
    run_dir = probed[0]
    stdout = _main_ok(report.main, [str(run_dir)])
    out = run_dir / "report"
    assert stdout.strip() == str(out / "report.md")
    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"{name}.png" for name in PLOTS)
    for link in links:
        assert _is_png(out / link), link
    assert text.startswith("# Run report: quickstart")
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in summary["stages"]:
        assert f"| {stage['stage']} | {'x'.join(map(str, stage['output_shape']))} |" in text
    assert f"val accuracy {summary['final']['val_accuracy']:.4f}" in text
    assert "## Linear probes" in text and "export none" in text
    # Each stage's peak memory, in the table's last columns (no GPU column on a CPU).
    gpu = any(stage.get("gpu_peak_memory_mb") is not None for stage in summary["stages"])
    assert "| images/s | peak MB |" in text and ("| GPU peak MB |" in text) == gpu
    for stage in summary["stages"]:
        assert re.search(rf"\n\| {stage['stage']} \|.* \| {stage['peak_memory_mb']:,.0f} \|",
                         text), stage
    assert "Peak MB: the training process's largest resident memory since the stage " \
           "began" in text
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


@pytest.mark.slow
def test_report_without_probes_with_ensemble_into_another_directory(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    summary["final"]["ensemble_val_accuracy"] = 0.9123
    # As on a GPU, and on a system that could not reset the host's peak.
    for stage in summary["stages"]:
        stage["gpu_peak_memory_mb"] = 1234.4
    summary["stages"][0]["peak_memory_since"] = "process"
    (copy / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "elsewhere" / "rep"
    _main_ok(report.main, [str(copy), "--output", str(out)])
    text = (out / "report.md").read_text()
    assert "ensemble val accuracy 0.9123" in text
    assert "| peak MB | GPU peak MB |" in text and text.count(" | 1,234 |\n") == 3
    assert ("or the process started where the system could not reset it; GPU: "
            "TensorFlow's peak on the fullest GPU") in text
    assert "## Linear probes" not in text
    assert _is_png(out / "depth.png") and not (copy / "report").exists()


@pytest.mark.slow
def test_report_of_a_decoupled_run_plots_each_module_and_every_head(run_dir, tmp_path):
    """A decoupled run has one stage entry but trains every head: the report adds
    each module's curves, and depth takes the heads' final scores."""
    copy = _copy(run_dir, tmp_path)
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r["train_module_accuracy"] = [0.4, 0.5, r["train_accuracy"]]
        r["val_module_accuracy"] = [0.3, 0.6, r["val_accuracy"]]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = json.loads((copy / "summary.json").read_text())
    summary["stages"] = summary["stages"][-1:]
    summary["final"]["head_val_accuracies"] = [0.3, 0.6, summary["final"]["val_accuracy"]]
    (copy / "summary.json").write_text(json.dumps(summary))
    _main_ok(report.main, [str(copy)])
    text = (copy / "report" / "report.md").read_text()
    assert "![Each module's head (decoupled)](modules.png)" in text
    assert _is_png(copy / "report" / "modules.png")
    from kgreedy.analysis.report import head_accuracies
    assert head_accuracies(summary) == {1: 0.3, 2: 0.6, 3: summary["final"]["val_accuracy"]}
    # A greedy run's report has no such plot.
    (tmp_path / "greedy").mkdir()
    plain = _copy(run_dir, tmp_path / "greedy")
    _main_ok(report.main, [str(plain)])
    assert not (plain / "report" / "modules.png").exists()
    assert "modules.png" not in (plain / "report" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("drop, needle", [
    ("metrics.jsonl", "metrics.jsonl is missing"),
    ("summary.json", "summary.json is missing"),
    ("recipe.json", "recipe.json is missing"),
])
def test_report_names_the_missing_file(run_dir, tmp_path, capsys, drop, needle):
    copy = _copy(run_dir, tmp_path, drop=[drop])
    assert needle in _usage_error(report.main, [str(copy)], capsys)
    assert not (copy / "report").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name, text, needle", [
    ("metrics.jsonl", "", "metrics.jsonl has no epoch records yet"),
    ("metrics.jsonl", '{"stage": 1,\n', "metrics.jsonl line 1 is not valid JSON"),
    ("summary.json", '{"stages": [', "summary.json: is not valid JSON"),
])
def test_report_refuses_unreadable_files(run_dir, tmp_path, capsys, name, text, needle):
    copy = _copy(run_dir, tmp_path)
    (copy / name).write_text(text)
    assert needle in _usage_error(report.main, [str(copy)], capsys)
    assert not (copy / "report").exists()


def test_report_cli_refuses_a_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "kgreedy.report", str(missing)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"kgreedy: error: RUN_DIR: is not a directory; received '{missing}'\n"
    assert not missing.exists()

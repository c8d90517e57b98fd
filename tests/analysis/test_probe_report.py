"""kgreedy.probe (layer-wise linear probes) and kgreedy.report (plots and report.md)
on a one-epoch-per-stage quickstart run."""

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
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


@pytest.mark.slow
def test_report_without_probes_with_ensemble_into_another_directory(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    summary["final"]["ensemble_val_accuracy"] = 0.9123
    (copy / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "elsewhere" / "rep"
    _main_ok(report.main, [str(copy), "--output", str(out)])
    text = (out / "report.md").read_text()
    assert "ensemble val accuracy 0.9123" in text
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

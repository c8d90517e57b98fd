"""tools/time_to_accuracy.py: the first epoch at which each run reaches a target eval
accuracy, in cumulative CPU or wall seconds, on hand-written run directories (whose
figures are known exactly), and once on a real tiny quickstart run."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from kgreedy import cli

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
TOOL_PATH = ROOT / "tools" / "time_to_accuracy.py"
TOOL = runpy.run_path(str(TOOL_PATH))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# (stage, epoch, val_accuracy, cpu_seconds, wall_seconds): two greedy stages whose
# epochs restart at 1, and an epoch without eval (a pass and time, but no point).
GREEDY = [(1, 1, 0.40, 100.0, 60.0), (1, 2, 0.55, 150.0, 70.0),
          (2, 1, None, 200.0, 80.0), (2, 2, 0.62, 250.0, 90.0),
          (2, 3, 0.71, 1000.0, 500.0)]
JOINT = [(1, 1, 0.65, 10.0, 5.0), (1, 2, 0.60, 10.0, 5.0)]


def make_run(parent, name, epochs, mode="greedy", precision="none", drop=()):
    """A run directory with recipe.json and metrics.jsonl; `drop` names keys to leave
    out of every epoch record (runs recorded before the timing fields existed)."""
    run = parent / name
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps(
        {"name": f"{name}_recipe", "train": {"mode": mode, "epochs_per_stage": 3,
                                             "mixed_precision": precision}}))
    lines = []
    for stage, epoch, accuracy, cpu, wall in epochs:
        record = {"stage": stage, "epoch": epoch, "val_accuracy": accuracy,
                  "train_accuracy": 0.5, "seconds": wall / 2, "cpu_seconds": cpu,
                  "wall_seconds": wall}
        lines.append(json.dumps({k: v for k, v in record.items() if k not in drop}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def table_rows(stdout):
    """{run: {column heading: cell}} of the Markdown table on stdout."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(heads, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[2:]]
    return {row["run"]: row for row in rows}


def test_table_and_json_sum_the_clock_across_stages(tmp_path, capsys):
    greedy = make_run(tmp_path, "greedy", GREEDY)
    joint = make_run(tmp_path, "joint", JOINT, mode="end_to_end", precision="mixed_bfloat16")
    out = tmp_path / "out.json"
    status = TOOL["main"]([str(greedy), str(joint), "--target", "0.7", "--target", "0.6",
                           "--target", "0.8", "--json", str(out)])
    assert status == 0
    rows = table_rows(capsys.readouterr().out)
    # Targets are sorted; 0.6 is reached at stage 2 epoch 2: 100+150+200+250 CPU s,
    # the eval-less epoch included; 0.7 only after the 1,000 s epoch.
    assert rows["greedy"]["≥ 0.60"] == "700 s (stage 2 epoch 2)"
    assert rows["greedy"]["≥ 0.70"] == "1,700 s (stage 2 epoch 3)"
    assert rows["greedy"]["≥ 0.80"] == "–"
    assert rows["greedy"]["CPU s (total)"] == "1,700"
    assert rows["greedy"]["data passes"] == "5"
    assert rows["greedy"]["final val acc"] == "0.7100"
    assert rows["joint"]["≥ 0.60"] == "10 s (stage 1 epoch 1)"
    assert rows["joint"]["≥ 0.70"] == "–"
    assert rows["joint"]["final val acc"] == "0.6000"
    assert (rows["joint"]["mode"], rows["joint"]["precision"]) == ("end_to_end",
                                                                   "mixed_bfloat16")

    report = json.loads(out.read_text())
    assert report["clock"] == "cpu" and report["targets"] == [0.6, 0.7, 0.8]
    first, second = report["runs"]
    assert (first["run"], first["recipe"], first["mode"]) == ("greedy", "greedy_recipe",
                                                              "greedy")
    assert first["data_passes"] == 5 and first["seconds"] == 1700.0
    assert first["final_accuracy"] == 0.71 and first["best_accuracy"] == 0.71
    assert first["reached"] == [
        {"target": 0.6, "stage": 2, "epoch": 2, "data_passes": 4, "seconds": 700.0},
        {"target": 0.7, "stage": 2, "epoch": 3, "data_passes": 5, "seconds": 1700.0},
        None]
    assert first["curve"] == [[100.0, 0.4], [250.0, 0.55], [700.0, 0.62], [1700.0, 0.71]]
    # The best is not the last: the end-to-end run fell back after its first epoch.
    assert second["best_accuracy"] == 0.65 and second["final_accuracy"] == 0.6
    assert second["reached"][0]["data_passes"] == 1 and second["reached"][1:] == [None, None]


def test_wall_clock_and_plot(tmp_path, capsys):
    greedy = make_run(tmp_path, "greedy", GREEDY, drop=("cpu_seconds",))
    png, out = tmp_path / "curves.png", tmp_path / "out.json"
    status = TOOL["main"]([str(greedy), "--clock", "wall", "--target", "0.7",
                           "--plot", str(png), "--json", str(out)])
    assert status == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["greedy"]["wall s (total)"] == "800"
    assert rows["greedy"]["≥ 0.70"] == "800 s (stage 2 epoch 3)"
    report = json.loads(out.read_text())
    assert report["clock"] == "wall"
    assert [x for x, _ in report["runs"][0]["curve"]] == [60.0, 130.0, 300.0, 800.0]
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "greedy", "out.json"]


def bad_input(tmp_path, capsys, args):
    """Runs the tool as its command line does, asking for both outputs; returns the
    one stderr line after checking the exit status and that nothing was written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cli.run(TOOL["main"], [*args, "--json", str(tmp_path / "out.json"),
                               "--plot", str(tmp_path / "out.png")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kgreedy: error: "), captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return lines[0]


def test_a_path_without_metrics_is_not_a_run_directory(tmp_path, capsys):
    good = make_run(tmp_path, "good", JOINT)
    empty = tmp_path / "empty"
    empty.mkdir()
    line = bad_input(tmp_path, capsys, [str(good), str(empty)])
    assert "no metrics.jsonl" in line and repr(str(empty)) in line


def test_metrics_without_any_val_accuracy(tmp_path, capsys):
    run = make_run(tmp_path, "noeval", [(1, 1, None, 5.0, 5.0), (1, 2, None, 5.0, 5.0)])
    line = bad_input(tmp_path, capsys, [str(run)])
    assert "val_accuracy" in line and repr(str(run)) in line


def test_records_without_cpu_seconds_suggest_the_wall_clock(tmp_path, capsys):
    run = make_run(tmp_path, "old", GREEDY, drop=("cpu_seconds",))
    line = bad_input(tmp_path, capsys, [str(run)])
    assert "no cpu_seconds" in line and "--clock wall" in line and repr(str(run)) in line


def test_records_without_any_timing_predate_it(tmp_path, capsys):
    run = make_run(tmp_path, "older", GREEDY, drop=("cpu_seconds", "wall_seconds"))
    line = bad_input(tmp_path, capsys, [str(run)])
    assert "predates per-epoch timing" in line and repr(str(run)) in line
    assert "--clock" not in line


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan", "seventy"])
def test_a_target_outside_zero_to_one(tmp_path, capsys, value):
    run = make_run(tmp_path, "good", JOINT)
    line = bad_input(tmp_path, capsys, [str(run), "--target", "0.5", "--target", value])
    assert "--target" in line and repr(value) in line


def test_a_target_of_one_is_accepted(tmp_path, capsys):
    run = make_run(tmp_path, "good", [(1, 1, 1.0, 3.0, 3.0)])
    assert TOOL["main"]([str(run), "--target", "1"]) == 0
    assert table_rows(capsys.readouterr().out)["good"]["≥ 1.00"] == "3 s (stage 1 epoch 1)"


@pytest.mark.slow
def test_a_real_tiny_run(tmp_path):
    """Records written by kgreedy.train itself: one point per epoch, the clock rising."""
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "kgreedy.train", "recipes/quickstart.json",
         "--set", "train.epochs_per_stage=1", "--set", "train.steps_per_epoch=2",
         "--set", "export.enabled=false", "--output", str(run_dir)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "tta.json"
    tool = subprocess.run(
        [sys.executable, str(TOOL_PATH), str(run_dir), "--target", "0.05", "--json", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert tool.returncode == 0, tool.stderr
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    (figures,) = json.loads(out.read_text())["runs"]
    assert len(records) == 3 == figures["data_passes"]  # three stages, one epoch each
    seconds = [s for s, _ in figures["curve"]]
    assert len(seconds) == len(records)
    assert seconds[0] > 0 and all(b > a for a, b in zip(seconds, seconds[1:]))
    assert figures["seconds"] == seconds[-1]
    assert figures["reached"][0] is not None and "| run |" in tool.stdout

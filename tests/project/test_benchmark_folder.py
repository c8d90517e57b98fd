"""tools/benchmark_folder.py: the image-folder epoch timings with and without the
decoded-image cache, on a few generated photos (the training half is left to the
CLI tests: it runs kgreedy.train twice)."""

import json
import runpy
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
TOOL = runpy.run_path(str(ROOT / "tools" / "benchmark_folder.py"))


@pytest.mark.slow
def test_pipeline_epochs_are_timed_side_by_side(tmp_path, capsys):
    out = tmp_path / "folder.json"
    status = TOOL["main"](["--make", "30", "--image-size", "16", "--batch-size", "4",
                           "--epochs", "2", "--train-epochs", "0", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["files"] == 30
    for mode in ("none", "memory"):
        figures = report["pipeline"][mode]
        assert len(figures["epoch_seconds"]) == 2
        assert figures["images"] == 20  # the first 10 of the 30 photos are in val/
        assert figures["first_pass_seconds"] > 0
    ratio = report["ratios"]["pipeline epochs after the first, none / memory"]
    assert ratio > 0
    assert "first pass s" in capsys.readouterr().out
    assert report["machine"]["cores"] >= 1


def test_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOL["run_main"]([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "folder: is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_cache_cost_measures_both_sides_of_the_trade(capsys):
    cost = runpy.run_path(str(ROOT / "tools" / "cache_cost.py"))
    figures = cost["main"](["--examples", "64"])
    assert len(figures["conv_gflops"]) == 4 and min(figures["conv_gflops"]) > 0
    assert figures["memory_gbps"] > 0 and figures["disk_gbps"] > 0
    assert "break-even prefix FLOPs per cached byte" in capsys.readouterr().out

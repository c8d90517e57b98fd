"""kgreedy.probe and kgreedy.report on a run of a model split into modules (ResNet-20
in three modules, on digits, two steps per stage)."""

import contextlib
import io
import json

import pytest

from kgreedy import cli, probe, report, train

pytestmark = pytest.mark.slow  # trains three stages, then probes twice (about a minute)

RECIPE = {"name": "resnet20_digits", "seed": 0,
          "model": {"architecture": "resnet20", "modules": 3},
          "aux": {"k": 1, "width": "auto", "pool_size": 1, "last_head": "model"},
          "train": {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 2,
                    "steps_per_execution": 2},
          "export": {"enabled": False}}


def _main_ok(main, argv):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.run(main, argv) == 0
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modules")
    (folder / "recipe.json").write_text(json.dumps(RECIPE))
    _main_ok(train.main, [str(folder / "recipe.json"), "--output", str(folder / "run")])
    return folder / "run"


def test_probe_and_report_of_a_split_model(run_dir):
    stdout = _main_ok(probe.main, [str(run_dir), "--max-train", "300", "--max-eval", "100"])
    result = json.loads((run_dir / "probes.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["unit"] == "module"
    modules = result["blocks"]  # the key of block runs, kept
    assert [m["block"] for m in modules] == [1, 2, 3]
    assert [m["output_shape"] for m in modules] == [[8, 8, 16], [4, 4, 32], [2, 2, 64]]
    for m, stage in zip(modules, summary["stages"]):
        assert m["output_shape"] == stage["output_shape"]
        assert m["features"] == 4 * m["output_shape"][2]  # pooled to 2x2
        assert m["head_val_accuracy"] == stage["val_accuracy"]
        assert 0.0 <= m["probe_eval_accuracy"] <= 1.0
    # Module 1 of an (almost untrained) ResNet-20 still separates the digits well.
    assert modules[0]["probe_eval_accuracy"] > 0.5
    assert stdout.count("module 1/3") == 1 and stdout.splitlines()[-6].split()[0] == "module"
    assert (run_dir / "probes.png").is_file()

    path = _main_ok(report.main, [str(run_dir)]).strip()
    text = (run_dir / "report" / "report.md").read_text()
    assert path == str(run_dir / "report" / "report.md")
    assert "; 3 modules of resnet20; 3 epochs recorded." in text
    assert "| module | output | features |" in text
    assert "each module's output" in text
    for stage in summary["stages"]:
        assert f"| {stage['stage']} | {'x'.join(map(str, stage['output_shape']))} |" in text


def test_probe_of_the_first_modules(run_dir):
    _main_ok(probe.main, [str(run_dir), "--max-train", "200", "--max-eval", "50",
                          "--stage", "2"])
    result = json.loads((run_dir / "probes.json").read_text())
    assert [m["block"] for m in result["blocks"]] == [1, 2]
    assert result["stage"] == 2

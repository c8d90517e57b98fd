"""The documented commands of decoupled training on a few CIFAR-10 images: the runs of
docs/RESULTS.md's decoupled section and their table. test_readme_commands.py maps
them here (`covered`), so they run beside that file's own commands instead of after
them."""

import json

import pytest

from test_network_commands import SHARED_TFDS, TINY, run, scratch  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (SHARED_TFDS / "cifar10").is_dir(), reason=f"no cifar10 in {SHARED_TFDS}")]

QUIET = ["--set", "export.enabled=false"]


def test_results_decoupled_runs_and_their_table(scratch):  # noqa: F811 (fixture)
    plain = run("python -m kgreedy.train recipes/cifar10_budget_decoupled.json "
                "--set data.data_dir=../shared/tfds --output runs/cifar10_budget_decoupled",
                scratch, [*TINY, *QUIET])
    # One stage of every module; each epoch line is followed by every head's.
    assert "stage 4/4:" in plain and "stage 1/4" not in plain
    assert "    modules 1..4: train acc " in plain
    buffered = run("python -m kgreedy.train recipes/cifar10_budget_decoupled_buffer.json "
                   "--set data.data_dir=../shared/tfds "
                   "--output runs/cifar10_budget_decoupled_buffer",
                   scratch, [*TINY, *QUIET, "--set", "train.decoupled.buffer_size=16"])
    assert "    modules 1..4: train acc " in buffered
    resnet = run("python -m kgreedy.train recipes/resnet32_cifar10_k4_decoupled.json "
                 "--set data.data_dir=../shared/tfds --set train.epochs_per_stage=4 "
                 "--output runs/resnet32_k4_decoupled", scratch, [*TINY, *QUIET])
    # Every module and head trains: more than ResNet-32's own 464,154 parameters.
    assert "stage 4/4:" in resnet and "0 frozen parameters" in resnet
    table = run("python tools/results_table.py runs/cifar10_budget_decoupled "
                "runs/cifar10_budget_decoupled_buffer runs/resnet32_k4_decoupled "
                "--json runs/decoupled.json", scratch)
    assert table.count("| decoupled |") == 3
    rows = json.loads((scratch / "runs" / "decoupled.json").read_text())["runs"]
    # A decoupled run trains every head: the table scores each and their ensemble.
    assert [len(r["head_accuracies"]) for r in rows] == [4, 4, 4]
    assert all(0.0 <= r["ensemble_accuracy"] <= 1.0 for r in rows)

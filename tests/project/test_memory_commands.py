"""The commands of docs/performance.md, "Training a network that end to end cannot
fit", on a few CIFAR-10 images, with the budget scaled to them: end to end is
refused in one line that names the modes that fit, the same network trains
decoupled and exports, and `model.modules: "auto"` picks and records its K.
test_readme_commands.py maps the commands here (`covered`)."""

import re
import shlex
import subprocess
import sys

import pytest

from test_network_commands import ENV, ROOT, SHARED_TFDS, TINY, run, scratch  # noqa: F401

from kgreedy.config.recipe import load_recipe
from kgreedy.data.spec import describe
from kgreedy.training import budget, memory

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (SHARED_TFDS / "cifar10").is_dir(), reason=f"no cifar10 in {SHARED_TFDS}")]

DATA = "--set data.data_dir=../shared/tfds "
END_TO_END = ("python -m kgreedy.train recipes/resnet32_cifar10_end_to_end.json " + DATA
              + "--memory-budget 950MB")


def tiny_budget():
    """Bytes between what the decoupled step and greedy's stages need on TINY's
    batch of 8 and what end to end needs: the documented 950 MB, scaled."""
    overrides = [value for flag, value in zip(TINY[::2], TINY[1::2]) if flag == "--set"]
    recipe = load_recipe(str(ROOT / "recipes" / "resnet32_cifar10_end_to_end.json"),
                         overrides)
    spec = describe(recipe.data)
    needs = dict(budget.compare_modes(recipe, spec, memory.estimate(recipe, spec)[0]))
    others = max(n for label, n in needs.items() if not label.startswith("end to end"))
    assert others < needs["end to end"]
    return (others + needs["end to end"]) // 2


def test_end_to_end_is_refused_and_the_same_network_trains_decoupled(scratch):  # noqa: F811
    limit = ["--memory-budget", f"{tiny_budget()}B"]
    proc = subprocess.run([sys.executable, *shlex.split(END_TO_END)[1:], *TINY, *limit],
                          cwd=scratch, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kgreedy: error: train.memory_budget: stage 4 needs about ")
    assert "what would fit: " in lines[0] and "train.mode 'decoupled' (" in lines[0]
    assert not (scratch / "runs").exists()

    out = run(END_TO_END + " --set train.mode=decoupled --output "
              "runs/resnet32_decoupled_950mb", scratch, [*TINY, *limit])
    assert "stage 4/4:" in out and "exported " in out, out[-2000:]
    assert (scratch / "runs" / "resnet32_decoupled_950mb" / "export").is_dir()

    # The K it picks trains what the runs above train: checked with --dry-run (the
    # suite's time), which plans and prints, and writes nothing.
    out = run("python -m kgreedy.train recipes/resnet32_cifar10_k4.json " + DATA
              + "--memory-budget 950MB --set model.modules=auto --output "
              "runs/resnet32_auto_950mb", scratch, [*TINY, *limit, "--dry-run"])
    plan = re.search(r"memory plan: model.modules 'auto' -> (\d+) modules", out)
    assert plan and int(plan.group(1)) >= 2, out[-2000:]
    assert f"{plan.group(1)} stages" in out
    assert not (scratch / "runs" / "resnet32_auto_950mb").exists()

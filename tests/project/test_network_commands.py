"""The documented commands of the bring-your-own-network pages, on a few CIFAR-10
images: the README's MobileNetV2 run and its serving check, and the ResNet-32 runs of
docs/RESULTS.md. test_readme_commands.py maps them here (`covered`), so they run
beside that file's own commands instead of after them."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
SHARED_TFDS = ROOT.parent / "shared" / "tfds"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                   os.environ.get("PYTHONPATH")]))}
# A few images, one step per stage; appended after the documented --set values,
# which they override.
TINY = ["--set", f"data.data_dir={SHARED_TFDS}", "--set", "data.train_split=train[:64]",
        "--set", "data.eval_split=test[:8]", "--set", "data.shuffle_buffer=64",
        "--set", "train.batch_size=8", "--set", "train.eval_batch_size=8",
        "--set", "train.epochs_per_stage=1", "--set", "train.steps_per_epoch=1"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (SHARED_TFDS / "cifar10").is_dir(), reason=f"no cifar10 in {SHARED_TFDS}")]


def run(command, cwd, extra=()):
    """Runs a documented `python ...` command as written (plus `extra`) in `cwd`,
    where recipes/ and tools/ link to the repository's."""
    argv = shlex.split(command) + list(extra)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{command}\nexit {proc.returncode}\n"
                                  f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture
def scratch(tmp_path):
    for name in ("recipes", "tools"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp_path


def test_readme_mobilenetv2_run_exports_and_passes_the_serving_check(scratch):
    out = run("python -m kgreedy.train recipes/mobilenetv2_cifar10_k4.json "
              "--output runs/mobilenetv2 --set data.data_dir=../shared/tfds "
              "--set train.epochs_per_stage=1 --set train.steps_per_epoch=100",
              scratch, TINY)
    assert "stage 4/4: output 1x1x1280" in out and "exported " in out
    check = run("python tools/check_serving.py "
                "runs/mobilenetv2/export/mobilenetv2_cifar10_k4/1", scratch)
    assert "checks passed" in check and "FAIL" not in check


def test_results_resnet32_greedy_and_end_to_end_runs(scratch):
    greedy = run("python -m kgreedy.train recipes/resnet32_cifar10_k4.json "
                 "--set data.data_dir=../shared/tfds --set train.epochs_per_stage=1 "
                 "--output runs/resnet32_k4", scratch, [*TINY, "--set", "export.enabled=false"])
    assert "stage 4/4: output 8x8x64" in greedy
    joint = run("python -m kgreedy.train recipes/resnet32_cifar10_end_to_end.json "
                "--set data.data_dir=../shared/tfds --set train.epochs_per_stage=4 "
                "--output runs/resnet32_end_to_end", scratch,
                [*TINY, "--set", "export.enabled=false"])
    # End to end: one stage of the whole of ResNet-32, its trainable parameters.
    assert "464,154 trainable and 0 frozen" in joint
    assert (scratch / "runs" / "resnet32_k4" / "summary.json").is_file()

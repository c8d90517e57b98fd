"""tools/profile_ops.py: each op's own time per stage step, by category, for kgreedy's
step and the PyTorch reference side by side; a bad flag is one line and exit 2."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
TOOL = ROOT / "tools" / "profile_ops.py"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
TINY = ["--set", "train.mixed_precision=none", "--set", "train.batch_size=16", "--steps", "1"]


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_stage_profiles_by_category(tmp_path):
    frameworks = "tensorflow,torch" if importlib.util.find_spec("torch") else "tensorflow"
    out = tmp_path / "profile.json"
    proc = run_tool(ROOT / "recipes" / "quickstart.json", "--stages", "2", "--frameworks",
                    frameworks, *TINY, "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (stage,) = report["stages"]
    assert stage["stage"] == 2
    for framework in frameworks.split(","):
        figures = stage[framework]
        categories = figures["categories"]
        assert categories["conv forward"] > 0 and categories["batch norm"] > 0
        backward = sum(v for k, v in categories.items() if k.startswith("conv backward"))
        assert backward > 0 and figures["wall_ms_per_step"] > 0
        # Stage 2's block starts with psi: a space-to-depth in TensorFlow, a copy
        # in the reference.
        assert categories["psi and layout copies"] > 0
        assert figures["top_ops"] and all(op["ms_per_step"] > 0 for op in figures["top_ops"])
    assert "conv backward (filter)" in proc.stdout and "wall" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["--frameworks", "jax"], "--frameworks"),
    (["--frameworks", "torch,torch"], "--frameworks"),
    (["--stages", "9"], "--stages"),
])
def test_bad_flags_are_one_line_and_exit_2(args, needle):
    proc = run_tool(ROOT / "recipes" / "quickstart.json", *args, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kgreedy: error: ") and needle in lines[0]

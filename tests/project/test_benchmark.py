"""`tools/benchmark.py` (docs/DESIGN.md, "Benchmark JSON"): a tiny run on the quickstart
recipe writes every figure the contract names, `--precisions` compares precisions and
`--torch` adds the PyTorch reference in the same run, `--memory` measures every way of
training side by side, and a bad flag fails with one line and exit status 2."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark child processes

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
TOOL = ROOT / "tools" / "benchmark.py"
QUICKSTART = ROOT / "recipes" / "quickstart.json"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

STAGE_KEYS = {"stage", "kgreedy_images_per_second", "minimal_images_per_second",
              "pipeline_images_per_second", "cached_images_per_second", "gflop_per_image",
              "achieved_gflops", "peak_rss_mb"}


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_quickstart_report(tmp_path):
    """Every figure of the contract, and `--precisions` in the same run (one run of
    the tool: its children dominate the suite's time)."""
    out = tmp_path / "bench.json"
    # Stages 1 and 3: the first (no frozen prefix) and one with a prefix; stage 2
    # would add five children and check nothing new.
    proc = run_tool(QUICKSTART, "--stages", "1,3", "--steps", 1, "--repeats", 1,
                    "--batch-size", 16, "--precisions", "none,mixed_bfloat16", "--torch", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["recipe"] == "quickstart" and report["batch_size"] == 16
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and "gpu" in machine
    assert machine["conv_gflops"] > 0 and machine["matmul_gflops"] > 0
    assert report["import_baseline_rss_mb"] > 0
    assert report["end_to_end"]["images_per_second"] > 0
    assert report["end_to_end"]["peak_rss_mb"] > report["import_baseline_rss_mb"] / 2

    stages = report["stages"]
    assert [s["stage"] for s in stages] == [1, 3]
    for s in stages:
        assert STAGE_KEYS <= set(s), STAGE_KEYS - set(s)
        assert s["kgreedy_images_per_second"] > 0 and s["minimal_images_per_second"] > 0
        assert s["pipeline_images_per_second"] > 0  # digits are always there
        assert s["gflop_per_image"] > 0 and s["achieved_gflops"] > 0
        assert s["peak_rss_mb"] > 0
    prefix = [s["prefix_gflop_per_image"] for s in stages]
    assert prefix[0] == 0 < prefix[1]
    assert stages[0]["cached_images_per_second"] is None  # stage 1 has no frozen prefix

    # The whole net at once: kgreedy's end-to-end loop and the decoupled step, with
    # their ratios to Keras' end-to-end fit computed from the figures themselves.
    loop, decoupled, e2e = report["end_to_end_loop"], report["decoupled"], report["end_to_end"]
    for row in (loop, decoupled):
        assert row["images_per_second"] > 0 and row["peak_rss_mb"] > 0
        assert row["over_end_to_end"] == row["images_per_second"] / e2e["images_per_second"]
        assert row["peak_over_end_to_end"] == (row["peak_above_baseline_mb"]
                                               / e2e["peak_above_baseline_mb"])
    assert loop["gflop_per_image"] == e2e["gflop_per_image"]
    # Decoupled does every module and every head forward and backward: stages 1 and
    # 3 measured here, and stage 2's module and head on top.
    assert decoupled["gflop_per_image"] > 3 * sum(s["stage_forward_gflop_per_image"]
                                                  for s in stages)
    assert decoupled["gflop_per_image"] > e2e["gflop_per_image"]
    assert decoupled["modules"] == 3 and decoupled["buffer_size"] == 0

    # The terminal table: a header, one row per stage, then the once-per-run lines.
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["stage", "kgreedy",
                                                                            "minimal"])
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["1", "3"]
    for start in ("end-to-end fit:", "end to end, kgreedy's loop:", "decoupled, 3 modules:",
                  "roofline:", "machine:"):
        assert any(line.startswith(start) for line in lines), start
    assert "benchmark: [" in proc.stderr  # progress lines
    check_precisions(report, proc.stdout)
    check_torch(report, proc.stdout)


def check_torch(report, stdout):
    """`--torch`: the PyTorch reference per stage with kgreedy's ratio over it, or,
    where PyTorch is not installed (the test extra leaves it out), the reason."""
    section = report["torch"]
    lines = [line for line in stdout.splitlines() if line.startswith("torch: ")]
    if importlib.util.find_spec("torch") is None:
        assert section["skipped"].startswith("PyTorch is not installed")
        assert section["rows"] == [] and lines == [f"torch: not measured: {section['skipped']}"]
        return
    assert section["skipped"] is None and section["version"] and section["threads"] >= 1
    assert [r["stage"] for r in section["rows"]] == [1, 3]
    for row, stage in zip(section["rows"], report["stages"]):
        assert row["torch_images_per_second"] > 0 and row["kgreedy_precision"] == "none"
        assert row["kgreedy_images_per_second"] == stage["kgreedy_images_per_second"]
        assert row["kgreedy_over_torch"] == (row["kgreedy_images_per_second"]
                                             / row["torch_images_per_second"])
        assert row["run"]["torch_threads"] == section["threads"]
    assert len(lines) == 3 and lines[1].startswith("torch: stage 1: ")
    assert f"kgreedy/torch {section['rows'][1]['kgreedy_over_torch']:.2f}" in lines[2]


def check_precisions(report, stdout):
    """`--precisions none,mixed_bfloat16`: each stage's kgreedy step and the end-to-end
    fit once per precision, in one run; bfloat16 really runs (the child's Keras policy
    says so, even where the CPU only emulates it)."""
    compared = ["none", "mixed_bfloat16"]
    section = report["precisions"]
    assert section["compared"] == compared
    assert section["resolved"] == {"none": "none", "mixed_bfloat16": "mixed_bfloat16"}
    assert section["notes"] == {"none": None, "mixed_bfloat16": None}

    rows = section["rows"]
    assert [(r["what"], r["stage"], r["precision"]) for r in rows] == [
        (what, stage, p) for what, stage in (("stage 1", 1), ("stage 3", 3),
                                             ("end_to_end", None)) for p in compared]
    policies = {"none": "float32", "mixed_bfloat16": "mixed_bfloat16"}
    for r in rows:
        assert r["resolved"] == r["precision"]
        assert r["run"]["keras_policy"] == policies[r["precision"]]
        assert r["images_per_second"] > 0 and r["peak_above_baseline_mb"] > 0
    for first, other in zip(rows[::2], rows[1::2]):
        assert first["over_first"] == 1.0
        assert other["over_first"] == other["images_per_second"] / first["images_per_second"]
    # The first precision's rows are the existing figures, not a second measurement.
    for j in range(2):
        assert (rows[2 * j]["images_per_second"]
                == report["stages"][j]["kgreedy_images_per_second"])
    assert rows[4]["images_per_second"] == report["end_to_end"]["images_per_second"]
    assert report["stages"][0]["runs"]["minimal"]["keras_policy"] == "float32"

    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["what", "precision",
                                                                           "ran"])
    table = [line.split() for line in lines[header + 1:header + 7]]
    assert [row[:-3] for row in table] == [
        *([*stage, p, p] for stage in (["stage", "1"], ["stage", "3"], ["end-to-end"])
          for p in compared)]
    assert [row[-2] for row in table[::2]] == ["1.00x"] * 3
    assert table[1][-2] == f"{rows[1]['over_first']:.2f}x"


def test_memory_report(tmp_path):
    """`--memory`: every way of training side by side in one run, each row's ratios
    computed from its own figures and end to end's, the greedy row the stage that
    peaked highest, the buffer really there, and each remat row's net really made
    under its RematScope: `list_of_layers` recomputes every conv in the traced
    gradient, `full` wraps every layer and, refused by a traced graph, ran eagerly.
    float32: Keras' remat recomputes outside the mixed-precision autocast scope."""
    out = tmp_path / "memory.json"
    proc = run_tool(QUICKSTART, "--memory", "--remat", "list_of_layers,full", "--stages", "2,3",
                    "--steps", 1, "--repeats", 1, "--batch-size", 16, "--buffer-size", 48,
                    "--set", "train.mixed_precision=none", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    memory = report["memory"]
    assert memory["remat_modes"] == ["list_of_layers", "full"] and memory["buffer_size"] == 48
    rows = {r["what"]: r for r in memory["rows"]}
    assert list(rows) == ["end_to_end", "end_to_end_loop", "end_to_end_eager",
                          "remat_list_of_layers",
                          "remat_full", "greedy_largest_stage", "decoupled",
                          "decoupled_buffer"]
    e2e, eager, loop = rows["end_to_end"], rows["end_to_end_eager"], rows["end_to_end_loop"]
    for r in rows.values():
        assert r["images_per_second"] > 0 and r["peak_above_baseline_mb"] > 0, r["what"]
        assert r["error"] is None and r["run"]["precision"] == "none"
        assert 0 < r["warmup_peak_above_baseline_mb"] <= r["peak_above_baseline_mb"]
        assert r["over_end_to_end"] == r["images_per_second"] / e2e["images_per_second"]
        assert r["peak_over_end_to_end"] == (r["peak_above_baseline_mb"]
                                             / e2e["peak_above_baseline_mb"])
        assert r["peak_over_end_to_end_loop"] == (r["peak_above_baseline_mb"]
                                                  / loop["peak_above_baseline_mb"])
        assert r["over_end_to_end_loop"] == (r["images_per_second"]
                                             / loop["images_per_second"])
        if r["run_eagerly"]:
            assert r["over_end_to_end_eager"] == (r["images_per_second"]
                                                  / eager["images_per_second"])
            assert r["peak_over_end_to_end_eager"] == (r["peak_above_baseline_mb"]
                                                       / eager["peak_above_baseline_mb"])
        else:
            assert r["over_end_to_end_eager"] is None
    assert e2e["over_end_to_end"] == 1.0 and e2e["remat"] is None
    assert [r["run_eagerly"] for r in rows.values()] == [False, False, True, False, True,
                                                         False, False, False]
    assert loop["images_per_second"] == report["end_to_end_loop"]["images_per_second"]
    assert e2e["run"]["run_eagerly"] is False and eager["run"]["run_eagerly"] is True

    lol, full = rows["remat_list_of_layers"]["remat"], rows["remat_full"]["remat"]
    assert lol["mode"] == "list_of_layers" and full["mode"] == "full"
    assert 0 < lol["wrapped_layers"] < lol["leaf_layers"] == full["wrapped_layers"]
    assert lol["conv_layers"] > 0 and lol["graph_error"] is None
    assert lol["graph_conv_ops"] == 2 * lol["conv_layers"]  # forward + recompute
    assert full["graph_conv_ops"] is None and "custom_gradient" in full["graph_error"]

    # The greedy row is the measured stage with the highest peak, its figures that
    # stage's; the decoupled row is the report's decoupled run, not a second one.
    peaks = {s["stage"]: s["peak_above_baseline_mb"] for s in report["stages"]}
    assert set(peaks) == {2, 3} and memory["largest_stage"] == max(peaks, key=peaks.get)
    greedy = rows["greedy_largest_stage"]
    assert greedy["stage"] == memory["largest_stage"]
    assert greedy["peak_above_baseline_mb"] == peaks[greedy["stage"]]
    assert rows["decoupled"]["images_per_second"] == report["decoupled"]["images_per_second"]
    assert rows["decoupled"]["run"]["replay_buffers"] == 0
    buffered = rows["decoupled_buffer"]["run"]
    assert buffered["replay_buffers"] == 2 and buffered["replay_buffer_entries"] == [48, 48]
    assert buffered["replay_buffer_mb"] > 0
    for what, target in memory["targets"].items():
        assert target["peak_over_end_to_end"] == rows[what]["peak_over_end_to_end"]
        assert target["peak_over_end_to_end_loop"] == rows[what]["peak_over_end_to_end_loop"]
        assert target["met"] == (target["peak_over_end_to_end"]
                                 <= target["peak_over_end_to_end_at_most"])
    for kind in ("minimal", "cached", "pipeline"):  # --memory measures none of these
        assert all(s[f"{kind}_images_per_second"] is None for s in report["stages"])

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["what", "eager",
                                                                           "peak"])
    table = [line.split() for line in lines[header + 1:header + 9]]
    assert [row[0] for row in table] == list(rows)
    assert table[0][1:3] == [f"{e2e['peak_above_baseline_mb']:,.0f}", "1.00"]
    assert sum(line.startswith("memory target: ") for line in lines) == 2


@pytest.mark.parametrize("args, flag", [(["--remat", "full"], "--remat"),
                                        (["--buffer-size", "64"], "--buffer-size"),
                                        (["--memory", "--remat", "full,bogus"], "--remat"),
                                        (["--memory", "--remat", "full,full"], "--remat"),
                                        (["--memory", "--buffer-size", "8"], "--buffer-size"),
                                        (["--memory", "--precisions", "none,auto"],
                                         "--precisions"),
                                        (["--memory", "--torch"], "--torch")])
def test_bad_memory_flags_are_one_line_and_exit_2(args, flag):
    proc = run_tool(QUICKSTART, *args, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no progress line: no child started
    assert lines[0].startswith("kgreedy: error: ") and flag in lines[0]


def test_torch_on_a_recipe_it_cannot_mirror_is_one_line_and_exit_2():
    """Refused before any child starts, with PyTorch installed or not."""
    proc = run_tool(ROOT / "recipes" / "resnet32_cifar10_k4.json", "--torch", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == ("kgreedy: error: --torch: the PyTorch reference builds plain-block "
                        "recipes (model.blocks) only; received 'resnet32'")


def test_child_resolves_auto_as_a_run_would(monkeypatch):
    """The child, not the parent, turns `auto` into a concrete precision: what
    `kgreedy.training.precision.choose` picks on this machine, with its note."""
    from kgreedy.config.recipe import load_recipe
    from kgreedy.training.precision import choose

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import benchmark_child

    raw = load_recipe(QUICKSTART).to_dict()
    recipe, note = benchmark_child.with_precision(raw, "auto")
    assert (recipe.train.mixed_precision, note) == choose("auto")
    recipe, note = benchmark_child.with_precision(raw, "mixed_bfloat16")
    assert (recipe.train.mixed_precision, note) == ("mixed_bfloat16", None)
    # The recipe's own: the quickstart says nothing, so the default, auto, resolved.
    assert raw["train"]["mixed_precision"] == "auto"
    assert benchmark_child.with_precision(raw)[0].train.mixed_precision == choose("auto")[0]
    raw["train"]["mixed_precision"] = "none"
    assert benchmark_child.with_precision(raw)[0].train.mixed_precision == "none"


@pytest.mark.parametrize("value", ["none", "none,none", "none,fp8"])
def test_bad_precisions_is_one_line_and_exit_2(value):
    proc = run_tool(QUICKSTART, "--precisions", value, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no progress line: no child started
    assert lines[0].startswith("kgreedy: error: ")
    assert "--precisions" in lines[0] and repr(value) in lines[0]


def test_flops_of_a_split_model_are_its_modules(monkeypatch):
    """The probe's FLOPs on a model split into modules: the prefix of stage j is
    modules 1..j-1, each as `kgreedy.training.cache.module_flops` counts it."""
    import tensorflow as tf

    from kgreedy.config.recipe import recipe_from_dict
    from kgreedy.training.cache import module_flops

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import benchmark_child

    recipe = recipe_from_dict({"name": "split", "model": {"architecture": "resnet20",
                                                          "modules": 3},
                               "aux": {"k": 1, "width": "auto", "pool_size": 1,
                                       "last_head": "model"}})
    net = benchmark_child.build_net(recipe, (8, 8, 1), 10)
    rows, end_to_end = benchmark_child.stage_flops(tf, net)
    own = [module_flops(m, s) for m, s in zip(net.modules, net.stage_shapes)]
    assert [prefix for prefix, _ in rows] == [0, own[0], own[0] + own[1]]
    assert all(stage > module for (_, stage), module in zip(rows, own))  # + the head
    assert end_to_end > 3 * sum(own)


def test_bad_stage_is_one_line_and_exit_2():
    proc = run_tool(QUICKSTART, "--stages", 9, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kgreedy: error: ")
    assert "--stages" in lines[0] and "'9'" in lines[0]


@pytest.mark.parametrize("flag, value", [("--stages", "²"), ("--stages", "1,²"),
                                         ("--steps", "²")])
def test_non_ascii_digit_is_one_line_and_exit_2(flag, value):
    """'²' passes str.isdigit() but int() refuses it: a usage error, not a traceback."""
    proc = run_tool(QUICKSTART, flag, value, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kgreedy: error: ")
    assert flag in lines[0] and repr(value) in lines[0]

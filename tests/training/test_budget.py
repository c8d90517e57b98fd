"""A run planned against a memory budget (`kgreedy.training.budget`): the budget's
forms and errors, the refusal that says what would fit (and what it says does fit),
`model.modules: "auto"` against a scan of every K, a resume that keeps its K, and
the dry run's comparison of modes."""

import json
import os
import re

import pytest

from kgreedy import cli, recipe_run, train
from kgreedy.base.errors import KgreedyError, RecipeError
from kgreedy.base.machine import format_bytes, parse_bytes
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.config.tune_recipe import tune_recipe_from_dict
from kgreedy.data.spec import describe
from kgreedy.training import budget, memory
from kgreedy.training.rundir import RunDir

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "recipes",
                          "quickstart.json")
FLOAT32 = ["--set", "train.mixed_precision=none"]  # the figures do not depend on the CPU
# ResNet-20 on digits: nine residual blocks to split, built in a second.
RESNET = {"name": "res_budget", "data": {"source": "digits"},
          "model": {"architecture": "resnet20", "modules": "auto"},
          "aux": {"k": 1, "width": "auto", "pool_size": 1, "last_head": "model"},
          # No feature cache: it grows with the modules, which would hide their effect.
          "train": {"batch_size": 64, "mixed_precision": "none", "epochs_per_stage": 1,
                    "steps_per_epoch": 1, "steps_per_execution": 1,
                    "cache_features": "off"},
          "export": {"enabled": False}}


def resnet(**train):
    raw = json.loads(json.dumps(RESNET))
    raw["train"].update(train)
    return recipe_from_dict(raw)


def need(recipe, modules):
    spec = describe(recipe.data)
    return budget.largest_need(budget.with_modules(recipe, modules), spec)[1]


def dry_run(capsys, *args):
    """(exit status, stdout, stderr lines) of `kgreedy.train --dry-run`."""
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(cli.run(train.main, [*args, "--dry-run"]))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err.strip().splitlines()


# ----------------------------------------------------------- the budget ----

def test_sizes_parse_in_units_of_1024_and_nothing_else_does():
    assert parse_bytes("12GB") == 12 * 2 ** 30
    assert parse_bytes("1.5 gb") == 3 * 2 ** 29
    assert parse_bytes("512MB") == 512 * 2 ** 20
    assert parse_bytes("100B") == 100
    for text in ("12", "nan", "NaNGB", "-1GB", "1e3MB", "12 GiB", "", None, 12):
        assert parse_bytes(text) is None, text


@pytest.mark.parametrize("value", ["12", "nan GB", "0GB", "lots", "0.0MB"])
def test_a_budget_that_is_not_a_size_is_refused_at_load(value):
    raw = json.loads(json.dumps(RESNET))
    raw["train"]["memory_budget"] = value
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    assert str(error.value).startswith("train.memory_budget: must be a size such as")
    assert str(error.value).endswith(f"received {value!r}")


def test_the_flag_is_checked_before_anything_runs(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, [QUICKSTART, "--memory-budget", "NaN", "--output",
                             str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--memory-budget" in err[0] and "received 'NaN'" in err[0]
    assert not (tmp_path / "run").exists()


def test_auto_is_what_the_host_has_free_and_a_gpu_without_nvidia_smi_is_refused(
        machine, monkeypatch):
    machine("meminfo", "MemAvailable: 1048576 kB\n")
    train_config = resnet(memory_budget="auto").train
    resolved = budget.resolve_budget(train_config)
    assert resolved.limit == 2 ** 30 and "host has free" in resolved.name
    monkeypatch.setattr(memory, "gpus", lambda: ["/physical_device:GPU:0"])
    monkeypatch.setattr(budget.shutil, "which", lambda name: None)
    with pytest.raises(KgreedyError, match="'auto' needs the free memory of the GPU"):
        budget.resolve_budget(train_config)


# ----------------------------------------------------------- refusals ----

def test_a_run_over_its_budget_is_refused_in_one_line_and_what_it_names_fits(
        capsys, tmp_path, machine):
    machine("meminfo", "MemAvailable: 16777216 kB\n")
    recipe = load_recipe(QUICKSTART, ["train.mixed_precision=none"])
    worst = memory.largest(memory.estimate(recipe, describe(recipe.data))[1])
    largest = format_bytes(worst.total)
    # Room for all but half the activations: the weights fit, a smaller batch does too.
    half = f"{worst.total - worst.activations // 2}B"
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, [QUICKSTART, *FLOAT32, "--memory-budget", half,
                             "--output", str(output)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("kgreedy: error: train.memory_budget: stage 3 needs about "
                           f"{largest} (weights ")
    assert "more than the memory budget of " in line and line.endswith(f"received '{half}'")
    assert not output.exists()
    batch = int(re.search(r"what would fit: train\.batch_size (\d+)", line).group(1))
    assert 0 < batch < 64
    # What the line names fits; one image more per batch does not.
    assert dry_run(capsys, QUICKSTART, *FLOAT32, "--memory-budget", half,
                   "--set", f"train.batch_size={batch}")[0] == 0
    assert dry_run(capsys, QUICKSTART, *FLOAT32, "--memory-budget", half,
                   "--set", f"train.batch_size={batch + 1}")[0] == 2


def test_an_end_to_end_run_is_told_which_modes_fit(machine):
    recipe = budget.with_modules(resnet(mode="end_to_end"), 3)
    spec = describe(recipe.data)
    net, stages, _ = memory.estimate(recipe, spec)
    end_to_end = memory.largest(stages).total
    greedy = budget.largest_need(budget.with_mode(recipe, "greedy"), spec, net=net)[1]
    assert greedy < end_to_end
    limit = (greedy + end_to_end) // 2
    phrase = budget.what_fits(recipe, spec, net, stages)(limit)
    assert "train.mode 'greedy'" in phrase
    named = budget.Budget(limit, "the memory budget of x", "x")
    with pytest.raises(KgreedyError, match="what would fit: .*train.mode 'greedy'"):
        memory.check(stages, None, named, budget.what_fits(recipe, spec, net, stages))
    memory.check(stages, None, budget.Budget(end_to_end, "exact", "x"))  # fits exactly


# ------------------------------------------------------- modules: auto ----

def test_auto_modules_is_the_fewest_that_fit_as_a_scan_of_every_k_finds():
    recipe = resnet()
    spec = describe(recipe.data)
    needs = {k: need(recipe, k) for k in range(1, 11)}  # ResNet-20 splits in 10 at most
    # Not strictly falling: 6 modules need a few bytes more than 5.
    assert needs[6] > needs[5] > needs[7]
    for k in (3, 7):  # 7: past the 6 that needs more than 5
        limit = needs[k]
        found, found_need, _ = budget.fewest_modules(recipe, spec, limit)
        scanned = min(j for j, n in needs.items() if n <= limit)
        assert found == scanned and found_need == needs[scanned]
    assert budget.fewest_modules(recipe, spec, min(needs.values()) - 1)[0] is None


def test_auto_modules_prints_its_plan_and_the_run_records_the_number(
        capsys, tmp_path, machine):
    machine("meminfo", "MemAvailable: 16777216 kB\n")
    recipe = resnet()
    limit = need(recipe, 3)
    assert need(recipe, 2) > limit  # else the plan below would pick 2
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(RESNET))
    output = tmp_path / "run"
    args = [str(path), "--memory-budget", f"{limit}B", "--output", str(output)]
    assert cli.run(train.main, args) == 0
    out = capsys.readouterr().out
    assert "memory plan: model.modules 'auto' -> 3 modules balanced by memory" in out
    saved = json.loads((output / "recipe.json").read_text())
    assert saved["model"]["modules"] == 3 and saved["model"]["balanced_memory"] is True
    # A resume keeps the number its run chose, whatever the budget would choose now.
    chosen, plan = recipe_run._planned_modules(
        resnet(), describe(recipe.data), None, None, recipe_run._saved_recipe(output))
    assert chosen.model.modules == 3 and "as the run chose when it started" in plan
    assert RunDir(str(output)).recipe == str(output / "recipe.json")


def test_no_k_that_fits_is_one_line_naming_the_least_need(capsys, tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(RESNET))
    status, _, err = dry_run(capsys, str(path), "--memory-budget", "1KB")
    assert status == 2 and len(err) == 1
    assert err[0].startswith("kgreedy: error: model.modules: 'auto' found no number of "
                             "modules whose largest stage fits the memory budget of 1.00 KB")
    assert err[0].endswith("received 'auto'")


def test_auto_modules_cannot_be_tuned():
    with pytest.raises(RecipeError, match="base.model.modules: 'auto' is planned"):
        tune_recipe_from_dict({"name": "t", "base": json.loads(json.dumps(RESNET)),
                               "search": {}})


# -------------------------------------------------- the dry run's table ----

def test_the_dry_run_compares_every_mode_against_the_budget(capsys, machine):
    machine("meminfo", "MemAvailable: 16777216 kB\n")
    # Without the feature cache, which greedy's stage 3 would add.
    off = ["train.mixed_precision=none", "train.cache_features=off"]
    recipe = load_recipe(QUICKSTART, off)
    spec = describe(recipe.data)
    rows = dict(budget.compare_modes(recipe, spec, memory.estimate(recipe, spec)[0]))
    assert list(rows) == ["end to end", "end to end, modules recomputed", "greedy stage 1",
                          "greedy stage 2", "greedy stage 3", "decoupled"]
    greedy = [rows[f"greedy stage {j}"] for j in (1, 2, 3)]
    assert max(greedy) < rows["end to end"] and rows["decoupled"] > max(greedy)
    assert rows["end to end, modules recomputed"] <= rows["end to end"]
    # A budget between greedy's largest stage and end to end's need.
    limit = (max(greedy) + rows["end to end"]) // 2
    status, out, _ = dry_run(capsys, QUICKSTART, *FLOAT32, "--set",
                             "train.cache_features=off", "--memory-budget", f"{limit}B")
    assert status == 0
    table = out[out.index("memory by mode at batch 64, against the memory budget of"):]
    verdicts = dict(re.findall(r"^  (\S.*?)\s{2,}\S+ [KMG]?B  (fits|does not fit)$",
                               table, re.MULTILINE))
    assert verdicts["end to end"] == "does not fit"
    assert all(verdicts[f"greedy stage {j}"] == "fits" for j in (1, 2, 3))
    assert verdicts["decoupled"] == ("fits" if rows["decoupled"] <= limit
                                     else "does not fit")

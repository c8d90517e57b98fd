"""Every command the README and the docs pages show is run by a test on tiny data.

The project rule: a documented command must not break. The README's image-folder
command once crashed at its first evaluation and no test ran it; this file makes
that impossible to repeat silently:

- it extracts every shell command from README.md and every page docs/*.md: lines
  starting with `python`, `python3` or `pip` (after `$ ` or `VAR=... ` prefixes, `\\`
  continuations joined, trailing `# comments` dropped) in fenced blocks that are not
  Python code, and inline code spans in the prose that start the same way. Other
  tools' commands (docker, tensorflow_model_server, curl, saved_model_cli,
  tensorboard) are not kgreedy's and are out of scope;
- a command with placeholders (UPPERCASE words such as RUN_DIR, `[--flag ...]`
  optional parts) is a synopsis: every `--flag` it names must be accepted by that
  command line's `--help`;
- every other command must be in COMMANDS below, which says how it is exercised:
  `tiny(...)`: run here in a subprocess from a scratch directory (where `recipes/`
  and `tools/` link to the repository's), exactly as written plus `--set` overrides
  that make it tiny (a shell loop's variable takes each of its values in turn, and
  `{a,b}` braces expand as the shell expands them); or `covered(...)`: another test
  runs it, and that test function must exist and its file must contain the command's
  distinctive parts, so the mapping cannot rot. A test file is named by its basename
  and found anywhere under tests/. A documented command missing from COMMANDS, or an
  entry no longer on any page, fails.
"""

import ast
import contextlib
import importlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kgreedy.config.recipe import load_recipe

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
README = ROOT / "README.md"
TESTS = ROOT / "tests"


def doc_pages():
    """README.md and every docs page: where documented commands live."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]
SHARED_TFDS = ROOT.parent / "shared" / "tfds"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                   os.environ.get("PYTHONPATH")]))}


# ------------------------------------------------------------ the table ----

@dataclass(frozen=True)
class Covered:
    """Run by another test: `where` is "test_x.py::test_name" (a test file, found by
    its basename anywhere under tests/) or a repository file such as .ci/run;
    `needles` are the command's distinctive parts, found in that file."""
    where: str
    needles: tuple


@dataclass(frozen=True)
class Tiny:
    """Run by this file: the commands of one `group` run in table order in one
    scratch directory, each with `extra` arguments appended ({tfds} is filled in).
    `each` = (name, values): the command uses the shell variable $name, as in a
    `for name in ...` loop of the page, and runs once per value. `dry_run`, where
    set, says why the command runs with --dry-run (its recipe, flags and network
    are checked, nothing trains): under the tiny overrides it would train exactly
    what a command before it in the group trained."""
    group: str
    extra: tuple
    each: tuple = ()
    dry_run: str = ""


def covered(where, *needles):
    return Covered(where, needles)


def tiny(group, *overrides, each=(), dry_run=""):
    return Tiny(group, tuple(a for o in overrides for a in ("--set", o)), each, dry_run)


def multi_worker_command(index):
    tf_config = {"cluster": {"worker": ["hostA:12345", "hostB:12345"]},
                 "task": {"type": "worker", "index": index}}
    return (f"TF_CONFIG='{json.dumps(tf_config)}' python -m kgreedy.train recipe.json "
            "--set distribute.strategy=multi_worker --output /shared/runs/big")


TINY_TRAIN = ("train.epochs_per_stage=1", "train.steps_per_epoch=2")
TINY_CIFAR10 = ("data.data_dir={tfds}", "data.train_split=train[:64]",
                "data.eval_split=test[:8]", "data.shuffle_buffer=64", "train.batch_size=8",
                "train.eval_batch_size=8", "train.epochs_per_stage=1",
                "train.steps_per_epoch=1",
                "export.enabled=false")  # exports are tested enough elsewhere; saves seconds
QUICKSTART_TEST = ("test_quickstart.py::"
                   "test_quickstart_trains_three_stages_and_reaches_90_percent")

# The bring-your-own-network commands run in their own file, beside this one.
MOBILENET_TEST = ("test_network_commands.py::"
                  "test_readme_mobilenetv2_run_exports_and_passes_the_serving_check")
RESNET32_TEST = "test_network_commands.py::test_results_resnet32_greedy_and_end_to_end_runs"
DECOUPLED_TEST = ("test_decoupled.py::"
                  "test_a_decoupled_run_records_every_module_and_exports_the_ensemble")
DECOUPLED_RESULTS_TEST = "test_decoupled_commands.py::test_results_decoupled_runs_and_their_table"
LOCAL_TEST = "test_local_objectives_commands.py::test_results_local_objective_runs"
ESTIMATE_TEST = ("test_memory_estimate.py::"
                 "test_the_estimate_is_within_a_quarter_of_the_measured_peak_on_every_stage")
CIFAR10_ESTIMATE_TEST = ("test_memory_estimate.py::"
                         "test_the_documented_cifar10_commands_run_on_a_few_images")
MEMORY_TEST = ("test_memory_commands.py::"
               "test_end_to_end_is_refused_and_the_same_network_trains_decoupled")
OBJECTIVES_TEST = ("test_objectives_engine.py::"
                   "test_each_objective_trains_the_quickstart_and_exports")

COMMANDS = {
    # Quickstart: .ci/run installs the package (with the test extra) and runs the
    # test command; tests/project/test_quickstart.py trains and serves the quickstart.
    "python3 -m venv .venv && . .venv/bin/activate":
        covered(".ci/run", "python3 -m venv .venv", ". .venv/bin/activate"),
    "python -m pip install -e . && python -m kgreedy.train recipes/quickstart.json "
    "--output runs/quickstart": (
        covered(".ci/run", "python -m pip install -e"),
        covered(QUICKSTART_TEST, "kgreedy.train", "quickstart.json", "--output")),
    'python -m pip install -e ".[test]" && python -m pytest -q':
        covered("test_docs.py::test_ci_runs_the_readme_test_command",
                'python -m pip install -e ".[test]" && python -m pytest -q'),
    # The fast subset: collected here (in the repository, nothing run, in this one
    # process: -n 0), which shows that the marker expression is accepted and still
    # selects tests.
    'python -m pytest -q -m "not slow"':
        Tiny("pytest", ("--collect-only", "-n", "0", "-p", "no:cacheprovider")),
    "pip install -e .":
        covered(".ci/run", "pip install -e"),
    # Command line.
    "python -m kgreedy.train recipes/cifar10_k3.json --dry-run":
        covered("test_recipe_cli.py::test_dry_run_cifar10_k3_needs_no_data",
                "kgreedy.train", "cifar10_k3.json", "--dry-run"),
    "python tools/recipe_reference.py":
        covered("test_docs.py::test_recipe_reference_matches_the_code",
                "recipe_reference.py", "reference_table"),
    "python tools/cache_cost.py":
        covered("test_benchmark_folder.py::"
                "test_cache_cost_measures_both_sides_of_the_trade", "cache_cost.py"),
    # Benchmarks (docs/BENCHMARKS.md): the tools' own tests run them on tiny inputs.
    "python tools/benchmark.py recipes/cifar10_k2.json --set data.data_dir=../shared/tfds "
    "--json out.json":
        covered("test_benchmark.py::test_quickstart_report", "benchmark.py", '"--json"'),
    "python tools/benchmark.py recipes/resnet32_cifar10_k4.json --set data.data_dir=../shared/tfds "
    "--stages 4 --steps 12 --repeats 5 --json out.json":
        covered("test_benchmark.py::test_quickstart_report", "benchmark.py", '"--json"',
                '"--steps"', '"--repeats"'),
    "python tools/benchmark.py recipes/cifar10_k2.json --set data.data_dir=../shared/tfds "
    "--precisions none,auto --json out.json":
        covered("test_benchmark.py::test_quickstart_report", "benchmark.py", '"--precisions"',
                '"--json"'),
    "python tools/benchmark.py recipes/cifar10_budget_k3.json --precisions none,auto "
    "--steps 10 --repeats 2 --warmup 3 --json out.json":
        covered("test_benchmark.py::test_quickstart_report", "benchmark.py", '"--precisions"',
                '"--steps"', '"--repeats"', '"--json"'),
    # docs/BENCHMARKS.md, "Memory": the --memory mode on the quickstart, every row.
    "python tools/benchmark.py recipes/resnet32_cifar10_k4.json --set name=resnet110_cifar10_k4 "
    "--set model.architecture=resnet110 --set data.data_dir=../shared/tfds --batch-size 64 "
    "--memory --json docs/benchmark_memory_resnet110.json":
        covered("test_benchmark.py::test_memory_report", "benchmark.py", '"--memory"',
                '"--batch-size"', '"--json"'),
    "python tools/benchmark.py recipes/resnet50_imagenet_k4.json --set data.image_size=128 "
    "--set train.mixed_precision=none --batch-size 32 --memory "
    "--json docs/benchmark_memory_resnet50.json":
        covered("test_benchmark.py::test_memory_report", "benchmark.py", '"--memory"',
                '"train.mixed_precision=none"', '"--batch-size"', '"--json"'),
    # docs/BENCHMARKS.md, "Where the memory goes": the same mode at other batches and
    # with the ResNet-50 recipe's heads and split changed, one remat mode.
    "python tools/benchmark.py recipes/resnet32_cifar10_k4.json --set name=resnet110_cifar10_k4 "
    "--set model.architecture=resnet110 --set data.data_dir=../shared/tfds --batch-size 256 "
    "--memory --remat activations --steps 2 --repeats 2 "
    "--json docs/benchmark_memory_resnet110_b256.json":
        covered("test_benchmark.py::test_memory_report", "benchmark.py", '"--memory"',
                '"--remat"', '"--steps"', '"--repeats"', '"--batch-size"'),
    "python tools/benchmark.py recipes/resnet32_cifar10_k4.json --set name=resnet110_cifar10_k4 "
    "--set model.architecture=resnet110 --set data.data_dir=../shared/tfds --batch-size 2 "
    "--memory --remat activations --steps 2 --repeats 2 "
    "--json docs/benchmark_memory_resnet110_b2.json":
        covered("test_benchmark.py::test_memory_report", "benchmark.py", '"--memory"',
                '"--remat"', '"--steps"', '"--repeats"', '"--batch-size"'),
    "python tools/benchmark.py recipes/resnet50_imagenet_k4.json --set data.image_size=128 "
    "--set train.mixed_precision=none --set aux.width=128 --set model.balanced_memory=true "
    "--batch-size 32 --memory --remat activations --steps 2 --repeats 2 "
    "--json docs/benchmark_memory_resnet50_balanced.json":
        covered("test_benchmark.py::test_memory_report", "benchmark.py", '"--memory"',
                '"--remat"', '"train.mixed_precision=none"', '"--batch-size"'),
    # docs/serving.md, "Early exits": the quickstart exported with early exits, by the
    # run and by kgreedy.export (one epoch per stage there).
    "python -m kgreedy.train recipes/quickstart.json --set export.heads=early_exit "
    "--output runs/quickstart_exits":
        covered("test_early_exit_export.py::test_a_run_calibrates_records_and_exports_its_exits",
                "QUICKSTART", '"export.heads=early_exit"'),
    "python -m kgreedy.export runs/quickstart_exits --heads early_exit":
        covered("test_early_exit_export.py::test_a_run_calibrates_records_and_exports_its_exits",
                "export_cli.main", '"--heads", "early_exit"'),
    "python -m kgreedy.export runs/local/dgl_k4 --heads early_exit":
        covered("test_early_exit_export.py::test_a_run_calibrates_records_and_exports_its_exits",
                "export_cli.main", '"--heads", "early_exit"'),
    "python tools/benchmark_exits.py runs/local/dgl_k4 --plain 1 --exits 3 --images 10000 "
    "--latency-images 1000 --json docs/benchmark_exits.json":
        covered("test_early_exit_export.py::test_a_run_calibrates_records_and_exports_its_exits",
                "benchmark_exits.py", '"--plain"', '"--exits"', '"--latency-images"',
                '"--json"'),
    "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python tools/benchmark.py "
    "recipes/cifar10_k2.json --stages 1,4 --set train.mixed_precision=none "
    "--set data.data_dir=../shared/tfds --torch --json docs/benchmark_torch_avx2.json":
        covered("test_benchmark.py::test_quickstart_report", "benchmark.py", '"--torch"',
                '"--stages"'),
    "python tools/benchmark.py recipes/cifar10_k2.json --stages 1,4 "
    "--set train.mixed_precision=none --set data.data_dir=../shared/tfds --torch "
    "--json docs/benchmark_torch_avx512.json":
        covered("test_benchmark.py::test_quickstart_report", "benchmark.py", '"--torch"',
                '"--stages"'),
    "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python tools/profile_ops.py "
    "recipes/cifar10_k2.json --stages 1,4 --set train.mixed_precision=none "
    "--json profile.json":
        covered("test_profile_ops.py::test_stage_profiles_by_category", "profile_ops.py",
                '"--stages"', '"--frameworks"', '"--json"'),
    "python tools/benchmark_folder.py --make 2000 --json docs/benchmark_folder.json":
        covered("test_benchmark_folder.py::test_pipeline_epochs_are_timed_side_by_side",
                "benchmark_folder.py", '"--make"', '"--json"'),
    # Several GPUs and several machines.
    "python -m kgreedy.train recipes/quickstart.json --set distribute.strategy=mirrored "
    "--set distribute.logical_cpus=2 --output runs/mirrored":
        tiny("mirrored", *TINY_TRAIN),
    **{multi_worker_command(index): covered(
        "test_multiworker.py::"
        "test_a_lost_worker_stops_the_chief_in_one_line_and_both_resume_to_the_end",
        "TF_CONFIG", "multi_worker", "kgreedy.train", '"index": index') for index in (0, 1)},
    # Serving.
    "pip install tensorflow-serving-api grpcio": (
        covered("setup.cfg", "tensorflow-serving-api"),
        covered("test_serving.py::test_grpc_request_round_trip",
                "tensorflow_serving.apis", "PredictRequest")),
    "python tools/check_serving.py runs/quickstart/export/quickstart/1":
        covered("test_serving.py::test_check_serving_passes_a_good_export",
                "check_serving.py"),
    "python -m kgreedy.predict runs/quickstart/export/quickstart digit.png": (
        covered("test_serving.py::test_predict_json_matches_the_model",
                "predict.main", "os.path.dirname(path)"),
        covered("test_serving.py::test_predict_bad_files_get_one_line_each",
                "kgreedy.predict")),
    # Training on CIFAR-10: the real data from ../shared/tfds, a few images of it.
    "python -m kgreedy.train recipes/cifar10_k2.json --output runs/cifar10_k2":
        tiny("cifar10", *TINY_CIFAR10),
    # docs/RESULTS.md: the four budget runs (each a few steps of its own recipe), the
    # table of them, and the probe and report of one, in one scratch directory.
    "python -m kgreedy.train recipes/cifar10_budget_$r.json --set data.data_dir=../shared/tfds "
    "--output runs/cifar10_budget_$r":
        tiny("results", *TINY_CIFAR10, each=("r", ("k1", "k2", "k3", "end_to_end"))),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4.json --set data.data_dir=../shared/tfds "
    "--set train.epochs_per_stage=1 --output runs/resnet32_k4":
        covered(RESNET32_TEST, "resnet32_cifar10_k4.json", "runs/resnet32_k4"),
    "python -m kgreedy.train recipes/resnet32_cifar10_end_to_end.json "
    "--set data.data_dir=../shared/tfds --set train.epochs_per_stage=4 "
    "--output runs/resnet32_end_to_end":
        covered(RESNET32_TEST, "resnet32_cifar10_end_to_end.json", "runs/resnet32_end_to_end"),
    "python -m kgreedy.train recipes/cifar10_budget_$r.json --set data.data_dir=../shared/tfds "
    "--set train.mixed_precision=mixed_bfloat16 --output runs/cifar10_budget_${r}_bf16":
        tiny("results", *TINY_CIFAR10, each=("r", ("k3", "end_to_end")),
             dry_run="the budget runs above, in bfloat16 (trained in bfloat16 by "
                     "test_precision.py)"),
    # docs/RESULTS.md, equal compute: 10 epochs per stage, the half-width pair, and the
    # time-to-accuracy figures regenerated from the committed records.
    "python -m kgreedy.train recipes/cifar10_budget_$r.json --set data.data_dir=../shared/tfds "
    "--set train.epochs_per_stage=10 --output runs/cifar10_budget_${r}_e10":
        tiny("results", *TINY_CIFAR10, each=("r", ("k3", "end_to_end")),
             dry_run="the budget runs above: the tiny overrides set 1 epoch per stage"),
    "python -m kgreedy.train recipes/cifar10_budget_half_k3.json "
    "--set data.data_dir=../shared/tfds --output runs/cifar10_budget_half_k3":
        tiny("results", *TINY_CIFAR10),
    "python -m kgreedy.train recipes/cifar10_budget_half_end_to_end.json "
    "--set data.data_dir=../shared/tfds --set train.epochs_per_stage=10 "
    "--output runs/cifar10_budget_half_end_to_end_e10":
        tiny("results", *TINY_CIFAR10),
    "python tools/time_to_accuracy.py docs/results/records/equal_compute/"
    "{k3_e4,k3_e4_bf16,k3_e10,e2e_e10,e2e_e16,e2e_e16_bf16,half_k3_e4,half_e2e_e10} "
    "--target 0.6 --target 0.7 --target 0.8 --json docs/results/equal_compute.json "
    "--plot docs/results/equal_compute.png":
        tiny("records"),
    "python tools/results_table.py runs/cifar10_budget_{k1,k2,k3,end_to_end} "
    "--json docs/results_cifar10_budget.json":
        tiny("results"),
    "python -m kgreedy.probe runs/cifar10_budget_k3":
        tiny("results"),
    "python -m kgreedy.report runs/cifar10_budget_k3":
        tiny("results"),
    # A kgreedy.fit run probed on a recipe's data: the probe tests fit one and run it.
    "python -m kgreedy.probe runs/my_fit --data recipes/quickstart.json":
        covered("test_probe_report.py::test_a_fit_run_is_probed_on_the_data_of_a_recipe",
                "kgreedy.fit", "--data", "quickstart.json"),
    # Bring your own network: the ResNet-32 dry run is test_split_recipes'; MobileNetV2
    # in 4 modules on a few CIFAR-10 images, exported, and its export checked.
    "python -m kgreedy.train recipes/resnet32_cifar10_k4.json --dry-run":
        covered("test_split_recipes.py::"
                "test_dry_run_resnet32_k4_prints_four_modules_and_resnet32s_count",
                "kgreedy.train", "resnet32_cifar10_k4.json", "--dry-run"),
    "python -m kgreedy.train recipes/mobilenetv2_cifar10_k4.json --output runs/mobilenetv2 "
    "--set data.data_dir=../shared/tfds --set train.epochs_per_stage=1 "
    "--set train.steps_per_epoch=100":
        covered(MOBILENET_TEST, "mobilenetv2_cifar10_k4.json", "runs/mobilenetv2"),
    "python tools/check_serving.py runs/mobilenetv2/export/mobilenetv2_cifar10_k4/1":
        covered(MOBILENET_TEST, "tools/check_serving.py",
                "runs/mobilenetv2/export/mobilenetv2_cifar10_k4/1"),
    # Decoupled training: test_decoupled runs the quickstart decoupled through the
    # command line (records, TensorBoard, export); the replay buffer's dry run here.
    "python -m kgreedy.train recipes/quickstart.json --set train.mode=decoupled "
    "--output runs/quickstart_decoupled":
        covered(DECOUPLED_TEST, "kgreedy.train", "quickstart.json", "train.mode",
                "decoupled", "--output"),
    "python -m kgreedy.train recipes/quickstart.json --set train.mode=decoupled "
    "--set train.decoupled.buffer_size=256 --dry-run":
        tiny("decoupled"),
    # docs/RESULTS.md, decoupled: the three runs and their table on a few images.
    "python -m kgreedy.train recipes/cifar10_budget_decoupled.json "
    "--set data.data_dir=../shared/tfds --output runs/cifar10_budget_decoupled":
        covered(DECOUPLED_RESULTS_TEST, "cifar10_budget_decoupled.json",
                "runs/cifar10_budget_decoupled"),
    "python -m kgreedy.train recipes/cifar10_budget_decoupled_buffer.json "
    "--set data.data_dir=../shared/tfds --output runs/cifar10_budget_decoupled_buffer":
        covered(DECOUPLED_RESULTS_TEST, "cifar10_budget_decoupled_buffer.json",
                "runs/cifar10_budget_decoupled_buffer"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4_decoupled.json "
    "--set data.data_dir=../shared/tfds --set train.epochs_per_stage=4 "
    "--output runs/resnet32_k4_decoupled":
        covered(DECOUPLED_RESULTS_TEST, "resnet32_cifar10_k4_decoupled.json",
                "train.epochs_per_stage=4", "runs/resnet32_k4_decoupled"),
    "python tools/results_table.py runs/cifar10_budget_decoupled "
    "runs/cifar10_budget_decoupled_buffer runs/resnet32_k4_decoupled --json runs/decoupled.json":
        covered(DECOUPLED_RESULTS_TEST, "tools/results_table.py", "--json runs/decoupled.json"),
    # docs/RESULTS.md, local objectives: the three cross-entropy runs are the ResNet-32
    # recipes other tests run on a few images with the same keys set; the four others
    # run on a few images in test_local_objectives_commands; the quickstart
    # with an InfoPro objective (docs/local-objectives.md) in test_objectives_engine.
    "python -m kgreedy.train recipes/quickstart.json --set aux.objective=infopro_contrast "
    "--set train.mode=decoupled --output runs/quickstart_infopro":
        covered(OBJECTIVES_TEST, "kgreedy.train", "quickstart.json", "aux.objective",
                "infopro_contrast", "decoupled", "--output"),
    "python -m kgreedy.train recipes/resnet32_cifar10_end_to_end.json --set data.data_dir=../shared/tfds "
    "--set 'data.train_split=train[:20000]' --set train.epochs_per_stage=16 --output runs/local/e2e":
        covered(RESNET32_TEST, "resnet32_cifar10_end_to_end.json",
                "train.epochs_per_stage", "data.train_split"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4.json --set data.data_dir=../shared/tfds "
    "--set 'data.train_split=train[:20000]' --set train.epochs_per_stage=4 --output runs/local/greedy_k4":
        covered(RESNET32_TEST, "resnet32_cifar10_k4.json", "train.epochs_per_stage",
                "data.train_split"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4_decoupled.json --set data.data_dir=../shared/tfds "
    "--set 'data.train_split=train[:20000]' --set train.epochs_per_stage=16 --output runs/local/dgl_k4":
        covered(DECOUPLED_RESULTS_TEST, "resnet32_cifar10_k4_decoupled.json",
                "train.epochs_per_stage", "TINY"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4_decoupled.json --set data.data_dir=../shared/tfds "
    "--set 'data.train_split=train[:20000]' --set train.epochs_per_stage=16 --set model.modules=8 --output runs/local/dgl_k8":
        covered(LOCAL_TEST, "resnet32_cifar10_k4_decoupled.json", "model.modules=8",
                "runs/local/dgl_k8"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4_infopro.json --set data.data_dir=../shared/tfds "
    "--set 'data.train_split=train[:20000]' --set train.epochs_per_stage=16 --output runs/local/contrast_k4":
        covered(LOCAL_TEST, "resnet32_cifar10_k4_infopro.json", "contrast_k4"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k8_infopro.json --set data.data_dir=../shared/tfds "
    "--set 'data.train_split=train[:20000]' --set train.epochs_per_stage=16 --output runs/local/contrast_k8":
        covered(LOCAL_TEST, "resnet32_cifar10_k8_infopro.json", "contrast_k8"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4_infopro.json --set data.data_dir=../shared/tfds "
    "--set 'data.train_split=train[:20000]' --set train.epochs_per_stage=16 --set aux.objective=infopro --output runs/local/infopro_k4":
        covered(LOCAL_TEST, "aux.objective=infopro", "infopro_k4"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4_infopro.json "
    "--set data.data_dir=../shared/tfds --dry-run":
        covered("test_architectures.py::test_every_shipped_recipe_dry_runs", "--dry-run",
                "recipes"),
    # docs/performance.md's memory demonstration: the budget scaled to a few images.
    "python -m kgreedy.train recipes/resnet32_cifar10_end_to_end.json --set data.data_dir=../shared/tfds "
    "--memory-budget 950MB":
        covered(MEMORY_TEST, "resnet32_cifar10_end_to_end.json", "--memory-budget 950MB"),
    "python -m kgreedy.train recipes/resnet32_cifar10_end_to_end.json --set data.data_dir=../shared/tfds "
    "--memory-budget 950MB --set train.mode=decoupled --output runs/resnet32_decoupled_950mb":
        covered(MEMORY_TEST, "train.mode=decoupled", "runs/resnet32_decoupled_950mb"),
    "python -m kgreedy.train recipes/resnet32_cifar10_k4.json --set data.data_dir=../shared/tfds "
    "--memory-budget 950MB --set model.modules=auto --output runs/resnet32_auto_950mb":
        covered(MEMORY_TEST, "model.modules=auto", "runs/resnet32_auto_950mb"),
    # docs/performance.md's estimate against the measured peak.
    "python tools/memory_estimate.py recipes/quickstart.json --json quickstart.json":
        covered(ESTIMATE_TEST, "memory_estimate.py", "quickstart.json", "--json"),
    "python tools/memory_estimate.py recipes/resnet32_cifar10_k4_decoupled.json "
    "--set data.data_dir=../shared/tfds":
        covered(CIFAR10_ESTIMATE_TEST, "memory_estimate.py",
                "resnet32_cifar10_k4_decoupled.json"),
    # Training on your own images: the README's photos/ is write_photo_folder's.
    "python -m kgreedy.train recipes/quickstart.json --output runs/photos "
    "--set data.source=image_folder --set data.data_dir=photos --set data.image_size=64 "
    "--set data.augment=imagenet --set data.channels=3":
        tiny("photos", *TINY_TRAIN, "train.batch_size=4"),
    # Searching auxiliary heads: one trial of one stage (its best_recipe.json must load
    # as a train recipe); test_tune trains a best_recipe.json that kgreedy.tune wrote.
    "python -m kgreedy.tune recipes/tune/aux_digits.json --output runs/tune_digits":
        tiny("tune", "max_trials=1", "stages=1", "epochs_per_trial=1", "steps_per_epoch=2"),
    "python -m kgreedy.train runs/tune_digits/best_recipe.json --output runs/tuned_digits":
        covered("test_tune.py::test_random_search_finishes_and_its_best_recipe_trains",
                "best_recipe.json", "cli.run(train.main"),
}

# Groups whose commands are expected to fail for now (xfail, not strict): remove an
# entry once its fix has landed.
PENDING = {}


# ------------------------------------------------ reading the pages ----

COMMAND_START = re.compile(r"(\$ )?([A-Z_][A-Z0-9_]*=\S+ )*(python3? |pip )")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(=[A-Z][A-Z0-9_]*)?(\.[a-z]+)?(\.\.\.)?")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=[^'\"\s]*")


def normalise(text):
    """One line, single spaces, without a leading `$ `."""
    text = " ".join(text.split())
    return text[2:] if text.startswith("$ ") else text


def _strip_comment(line):
    """The line without a trailing shell comment (a `#` outside quotes, after a blank)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def _shell_lines(block):
    """A fenced block's logical lines: `\\` continuations joined, comments dropped."""
    lines, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            lines.append(pending + line)
            pending = ""
    return [_strip_comment(line) for line in lines + ([pending] if pending else [])]


def _starts_a_command(text):
    # The `VAR=value` prefix may be quoted JSON with spaces: test after shlex.
    if COMMAND_START.match(text):
        return True
    try:
        words = shlex.split(text)
    except ValueError:
        return False
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0], re.S):
        words = words[1:]
    return bool(words) and words[0] in ("python", "python3", "pip")


def extract_commands(markdown):
    """Every shell command the markdown shows, normalised, in order of appearance."""
    commands, prose, fence, block = [], [], None, []
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, block = stripped[3:].strip(), []
                prose.append("")  # a fence ends a paragraph
            else:
                if fence != "python":
                    commands += [normalise(c) for c in _shell_lines(block)
                                 if _starts_a_command(normalise(c))]
                fence = None
            continue
        if fence is None:
            prose.append(line)
        else:
            block.append(stripped)
    # Inline code spans can wrap onto the next line, never past a paragraph.
    for paragraph in re.split(r"\n\s*\n", "\n".join(prose)):
        for span in re.findall(r"`([^`]+)`", paragraph):
            if _starts_a_command(normalise(span)):
                commands.append(normalise(span))
    return list(dict.fromkeys(commands))


def is_synopsis(command):
    """A usage synopsis: optional `[--flag ...]` parts or UPPERCASE placeholders."""
    if re.search(r"\[-", command):
        return True
    words = command.split()
    while words and ENV_ASSIGNMENT.fullmatch(words[0]):
        words = words[1:]  # ONEDNN_MAX_CPU_ISA=AVX2 python ...: the environment, not a word
    words = [w.strip("[]").removesuffix("...") for w in words]
    return any(PLACEHOLDER.fullmatch(w) for w in words if w and not w.startswith("-"))


def documented_commands(pages=None):
    """{command: [pages showing it]} over README.md and docs/*.md, in page order."""
    found = {}
    for page in doc_pages() if pages is None else pages:
        name = page.relative_to(ROOT).as_posix()
        for command in extract_commands(page.read_text(encoding="utf-8")):
            found.setdefault(command, []).append(name)
    return found


def unmapped_and_stale(commands, table):
    """Runnable documented commands missing from the table, and table entries that no
    page shows any more."""
    runnable = [c for c in commands if not is_synopsis(c)]
    return [c for c in runnable if c not in table], [c for c in table if c not in runnable]


def test_extraction_finds_fenced_continued_inline_and_prompted_commands():
    markdown = "\n".join([
        "Set up (`python3 -m venv .venv`), then run `python -m kgreedy.x A_DIR",
        "[--flag N]` or `--set a=1` (not a command).", "",
        "```bash", "# a comment", "python -m kgreedy.train r.json \\",
        "  --output runs/r", "curl -s http://localhost", "```",
        "  ```", "  $ python -m kgreedy.predict e digit.png", "  digit.png", "  ```",
        "```python", "python = 1", "```",
        "```bash", "TF_CONFIG='{\"a\": 1}' \\", "  python -m kgreedy.train r.json", "```",
        "```bash", "for r in a b; do", "  python -m kgreedy.probe runs/$r   # and c",
        "done", "python -m kgreedy.report 'a # b'", "```",
    ])
    assert extract_commands(markdown) == [
        "python -m kgreedy.train r.json --output runs/r",
        "python -m kgreedy.predict e digit.png",
        "TF_CONFIG='{\"a\": 1}' python -m kgreedy.train r.json",
        "python -m kgreedy.probe runs/$r",
        "python -m kgreedy.report 'a # b'",
        "python3 -m venv .venv",
        "python -m kgreedy.x A_DIR [--flag N]",
    ]
    assert is_synopsis("python -m kgreedy.x A_DIR [--flag N]")
    assert is_synopsis("python -m kgreedy.export RUN_DIR")
    assert is_synopsis("python tools/benchmark.py RECIPE --json out.json")
    assert not is_synopsis('python -m pip install -e ".[test]" && python -m pytest -q')
    assert not is_synopsis("TF_CONFIG='{\"a\": 1}' python -m kgreedy.train r.json")
    # An environment prefix is not a placeholder; an UPPERCASE word after it is.
    assert not is_synopsis("ONEDNN_MAX_CPU_ISA=AVX2 python tools/benchmark.py r.json")
    assert is_synopsis("ONEDNN_MAX_CPU_ISA=AVX2 python tools/benchmark.py RECIPE")


# --------------------------------------------------------- the mapping ----

def test_the_pages_are_readme_and_every_docs_page():
    names = [p.relative_to(ROOT).as_posix() for p in doc_pages()]
    assert names[0] == "README.md" and "docs/BENCHMARKS.md" in names, names
    assert all(n.startswith("docs/") and n.endswith(".md") for n in names[1:]), names


def test_every_documented_command_is_in_the_table():
    commands = documented_commands()
    missing, stale = unmapped_and_stale(commands, COMMANDS)
    problems = []
    if missing:
        problems.append(
            "documented commands that no test runs; add each to COMMANDS in "
            "tests/project/test_readme_commands.py, as tiny(...) (run here on tiny data) or "
            "covered(...) (the test that runs it):\n"
            + "\n".join(f"  {c}  ({', '.join(commands[c])})" for c in missing))
    if stale:
        problems.append("COMMANDS entries no longer on README.md or any docs page; "
                        "update or remove them:\n" + "\n".join(f"  {c}" for c in stale))
    assert not problems, "\n".join(problems)


def test_a_new_command_on_a_docs_page_is_caught(tmp_path):
    """The check above can fail: a page with one unmapped command, one mapped one."""
    page = tmp_path / "page.md"
    page.write_text("Run `python -m kgreedy.train recipes/new.json`, or\n\n```bash\n"
                    "python tools/cache_cost.py\n```\n", encoding="utf-8")
    commands = extract_commands(page.read_text(encoding="utf-8"))
    missing, stale = unmapped_and_stale(commands, COMMANDS)
    assert missing == ["python -m kgreedy.train recipes/new.json"]
    assert "python tools/cache_cost.py" not in stale


def mapped_file(where_file):
    """A mapping's file: a test file by basename anywhere under tests/, else a path."""
    name = Path(where_file).name
    if name.startswith("test_") and name.endswith(".py"):
        hits = sorted(TESTS.rglob(name))
        assert len(hits) == 1, f"{name}: expected one file under tests/, found {hits}"
        return hits[0]
    return ROOT / where_file


def _test_functions(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items()
                                     if not isinstance(how, Tiny)])
def test_covered_commands_name_a_test_that_runs_them(command):
    ways = COMMANDS[command]
    for how in ways if isinstance(ways, tuple) else (ways,):
        file, _, function = how.where.partition("::")
        path = mapped_file(file)
        assert path.is_file(), f"{command!r} is mapped to {how.where}, which does not exist"
        if function:
            assert function in _test_functions(path), (
                f"{command!r} is mapped to {how.where}: {file} has no function {function}")
        text = path.read_text(encoding="utf-8")
        absent = [n for n in how.needles if n not in text]
        assert not absent, (f"{command!r} is mapped to {how.where}, but {file} no longer "
                            f"contains {absent}: does it still run the command?")


# ---------------------------------------------------------- synopses ----

def _help_text(cli):
    """`--help` of a `-m module` or a script path, run in this process (argparse only).
    A script sees its own folder first on sys.path, as `python tools/x.py` gives it."""
    if cli.endswith(".py"):
        script = ROOT / cli
        sys.path.insert(0, str(script.parent))
        try:
            main = runpy.run_path(str(script))["main"]
        finally:
            sys.path.remove(str(script.parent))
    else:
        main = importlib.import_module(cli).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0, f"{cli} --help exited with {exit_.value.code}"
    return out.getvalue()


def _cli_of(synopsis):
    words = synopsis.split()
    assert words[0] == "python", f"unexpected synopsis form: {synopsis}"
    return words[2] if words[1] == "-m" else words[1]


def test_synopsis_flags_are_accepted_by_the_command_line():
    commands = documented_commands()
    synopses = [c for c in commands if is_synopsis(c)]
    by_cli = {}
    for synopsis in synopses:
        by_cli.setdefault(_cli_of(synopsis), []).append(synopsis)
    assert {"kgreedy.train", "kgreedy.export", "kgreedy.tune", "kgreedy.predict",
            "kgreedy.probe", "kgreedy.report"} <= set(by_cli), sorted(by_cli)
    unknown = []
    for cli, shown in by_cli.items():
        help_text = _help_text(cli)
        accepted = set(FLAG.findall(help_text))
        unknown += [f"{cli}: {flag} ({', '.join(commands[s])}: {s})" for s in shown
                    for flag in FLAG.findall(s) if flag not in accepted]
    assert not unknown, ("documented synopses name flags their command line does not "
                         "accept:\n" + "\n".join(unknown))


# ------------------------------------------------ running on tiny data ----

def write_photo_folder(root):
    """photos/{train,val}/{cat,dog}: JPEGs of different sizes and aspect ratios and a
    PNG per class, each a noisy image whose colour depends on the class. The
    evaluation folder is val/, one of the names the image-folder loader accepts."""
    rng = np.random.default_rng(0)
    colours = {"cat": (200, 80, 40), "dog": (40, 90, 210)}
    files = {"train": [("a.jpg", 40, 30), ("b.jpg", 23, 57), ("c.jpg", 64, 64),
                       ("d.jpg", 100, 75), ("e.png", 31, 47)],
             "val": [("f.jpg", 50, 20), ("g.png", 64, 64)]}
    for split, shapes in files.items():
        for cls, colour in colours.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for name, width, height in shapes:
                pixels = rng.normal(colour, 30, (height, width, 3)).clip(0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / name)


def _setup_group(group, scratch):
    """Prepares the scratch directory; returns the directory to run in and the
    values for {name} in extras."""
    if group == "pytest":
        return ROOT, {}  # the suite itself: collected in the repository
    for name in ("recipes", "tools"):
        (scratch / name).symlink_to(ROOT / name, target_is_directory=True)
    if group in ("cifar10", "results"):
        if not (SHARED_TFDS / "cifar10").is_dir():
            pytest.skip(f"no TFDS data_dir with cifar10 at {SHARED_TFDS}")
        (scratch / "docs").mkdir()  # results_table.py --json docs/...
        return scratch, {"tfds": str(SHARED_TFDS)}
    if group == "photos":
        write_photo_folder(scratch / "photos")
    if group == "records":  # the committed run records that docs/RESULTS.md's figures read
        (scratch / "docs" / "results").mkdir(parents=True)
        (scratch / "docs" / "results" / "records").symlink_to(
            ROOT / "docs" / "results" / "records", target_is_directory=True)
    return scratch, {}


def _brace_expand(word):
    """`a_{x,y}` -> [a_x, a_y], as the shell expands one pair of braces."""
    match = re.fullmatch(r"(.*?)\{([^{}]*,[^{}]*)\}(.*)", word)
    if not match:
        return [word]
    head, options, tail = match.groups()
    return [w for option in options.split(",") for w in _brace_expand(head + option + tail)]


def command_runs(command, how):
    """The argv lists a table entry runs, as the shell would expand the command."""
    name, values = how.each or (None, (None,))
    runs = []
    for value in values:
        text = command if name is None else re.sub(r"\$\{?%s\}?" % name, value, command)
        assert "$" not in text, f"an unexpanded shell variable: {command}"
        argv = [w for word in shlex.split(text, comments=True) for w in _brace_expand(word)]
        runs.append(argv)
    return runs


def test_command_runs_expand_loops_braces_and_comments():
    how = tiny("g", "a=1", each=("r", ("k1", "k2")))
    assert command_runs("python -m m x_$r.json --output runs/${r}", how) == [
        ["python", "-m", "m", "x_k1.json", "--output", "runs/k1"],
        ["python", "-m", "m", "x_k2.json", "--output", "runs/k2"]]
    assert command_runs("python t.py runs/b_{k1,end} --json o.json  # c", tiny("g")) == [
        ["python", "t.py", "runs/b_k1", "runs/b_end", "--json", "o.json"]]


def _check_outputs(argv, cwd, stdout):
    """What a successful command leaves behind."""
    if argv[1:3] == ["-m", "pytest"]:
        assert re.search(r"\d+(/\d+)? tests? collected", stdout), stdout[-2000:]
        return
    if argv[1] == "tools/results_table.py":
        rows = json.loads((cwd / argv[argv.index("--json") + 1]).read_text())["runs"]
        assert len(rows) == len([a for a in argv[2:] if a.startswith("runs/")]), rows
        return
    if argv[1] == "tools/time_to_accuracy.py":
        # Regenerated from the committed records, the figures must be the committed ones.
        written = argv[argv.index("--json") + 1]
        assert json.loads((cwd / written).read_text()) == json.loads(
            (ROOT / written).read_text()), f"{written} no longer matches its records"
        assert (cwd / argv[argv.index("--plot") + 1]).stat().st_size > 10_000
        return
    if argv[2] == "kgreedy.probe":
        assert (cwd / argv[3] / "probes.json").is_file()
        return
    if argv[2] == "kgreedy.report":
        assert (cwd / argv[3] / "report" / "report.md").is_file()
        return
    if "--dry-run" in argv:  # prints the stage table, writes nothing
        assert "deployed model (trunk + stage" in stdout, stdout[-2000:]
        if "--output" in argv:
            assert not (cwd / argv[argv.index("--output") + 1]).exists()
        return
    scratch = cwd
    out = scratch / argv[argv.index("--output") + 1]
    if argv[2] == "kgreedy.train":
        summary = json.loads((out / "summary.json").read_text())
        if "export.enabled=false" in argv:
            return
        export = scratch / summary["final"]["export_path"]  # absolute stays absolute
        assert export.parent.parent.resolve() == (out / "export").resolve(), export
        assert (export / "saved_model.pb").is_file(), f"no SavedModel in {export}"
        if (scratch / "photos").is_dir():
            _check_both_signatures_answer(export, scratch / "photos")
    elif argv[2] == "kgreedy.tune":
        assert (out / "tuning.json").is_file()
        best = load_recipe(out / "best_recipe.json")  # a valid train recipe
        assert best.train.epochs_per_stage > 1, "the base's own epochs, not the trials'"


def _check_both_signatures_answer(export, photos):
    """The image-folder export answers raw pixels of any size and encoded files."""
    import tensorflow as tf

    model = tf.saved_model.load(str(export))
    pixels = tf.random.uniform([2, 50, 70, 3], 0, 255)
    out = model.signatures["serving_default"](images=pixels)
    assert tuple(out["probabilities"].shape) == (2, 2)
    files = sorted((photos / "val").rglob("*.*"))
    out = model.signatures["serve_encoded"](
        image_bytes=tf.constant([f.read_bytes() for f in files]))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)
    assert set(out["class_names"].numpy().astype(str)) <= {"cat", "dog"}


TINY_GROUPS = sorted({how.group for how in COMMANDS.values() if isinstance(how, Tiny)})


@pytest.mark.slow
@pytest.mark.parametrize("group", [
    pytest.param(g, marks=pytest.mark.xfail(strict=False, reason=PENDING[g]))
    if g in PENDING else g for g in TINY_GROUPS])
def test_documented_commands_run_on_tiny_data(group, tmp_path):
    cwd, values = _setup_group(group, tmp_path)
    for command, how in COMMANDS.items():  # table order within a group
        if not isinstance(how, Tiny) or how.group != group:
            continue
        for argv in command_runs(command, how):
            assert argv[0] == "python" and not {"&&", "|", ";"} & set(argv), (
                f"tiny() runs plain `python ...` commands only: {command}")
            argv += [arg.format(**values) for arg in how.extra]
            if how.dry_run:
                argv.append("--dry-run")
            proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=ENV,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (
                f"documented command failed with exit status {proc.returncode}:\n"
                f"  {command}\nrun as: {shlex.join(argv)}\n(in {cwd})\n"
                f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
            _check_outputs(argv, cwd, proc.stdout)

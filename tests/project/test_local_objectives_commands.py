"""The documented commands of docs/RESULTS.md's "Local objectives" section that train
a configuration no other test runs (DGL at K=8, InfoPro's objectives), on a few
CIFAR-10 images. test_readme_commands.py maps them here (`covered`), so they run
beside that file's own commands instead of after them."""

import pytest

from test_network_commands import SHARED_TFDS, TINY, run, scratch  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (SHARED_TFDS / "cifar10").is_dir(), reason=f"no cifar10 in {SHARED_TFDS}")]

QUIET = ["--set", "export.enabled=false"]
DATA = "--set data.data_dir=../shared/tfds --set 'data.train_split=train[:20000]' "


def test_results_local_objective_runs(scratch):  # noqa: F811 (fixture)
    dgl_k8 = run("python -m kgreedy.train recipes/resnet32_cifar10_k4_decoupled.json " + DATA
                 + "--set train.epochs_per_stage=16 --set model.modules=8 "
                 "--output runs/local/dgl_k8", scratch, [*TINY, *QUIET])
    assert "stage 8/8:" in dgl_k8 and "    modules 1..8: train acc " in dgl_k8
    for recipe, extra, name, modules in (
            ("resnet32_cifar10_k4_infopro.json", "", "contrast_k4", 4),
            ("resnet32_cifar10_k4_infopro.json", "--set aux.objective=infopro ",
             "infopro_k4", 4)):
        out = run(f"python -m kgreedy.train recipes/{recipe} " + DATA
                  + f"--set train.epochs_per_stage=16 {extra}--output runs/local/{name}",
                  scratch, [*TINY, *QUIET])
        assert f"stage {modules}/{modules}:" in out, out[-2000:]
        assert (scratch / "runs" / "local" / name / "summary.json").is_file()
    # The K=8 recipe trains what contrast_k4 and dgl_k8 train above, in 8 modules and
    # with its own weights: its command is checked with --dry-run (the suite's time),
    # which loads the recipe, builds and sizes the net and prints each module's weights.
    out = run("python -m kgreedy.train recipes/resnet32_cifar10_k8_infopro.json " + DATA
              + "--set train.epochs_per_stage=16 --output runs/local/contrast_k8", scratch,
              [*TINY, *QUIET, "--dry-run"])
    assert "8 stages" in out and "objective: infopro_contrast" in out, out[-2000:]
    assert "w_rec/w_task by module: 5/0 " in out, out[-2000:]
    assert not (scratch / "runs" / "local" / "contrast_k8").exists()

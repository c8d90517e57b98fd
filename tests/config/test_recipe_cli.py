"""Recipes and the `python -m kgreedy.train` command line (docs/DESIGN.md, "Contracts"):
bad recipes fail with exit status 2 and one `kgreedy: error:` line naming the key,
`--set` overrides, the resolved recipe round trip, and `--dry-run` parameter counts."""

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kgreedy import cli
from kgreedy import data
from kgreedy import train as train_cli
from kgreedy.base.errors import KgreedyError, RecipeError
from kgreedy.config.data_checks import check_against_data
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.training import run

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# A small valid digits recipe; every bad recipe below is derived from it.
BASE = {
    "name": "tiny_digits",
    "seed": 0,
    "data": {"source": "digits"},
    "model": {"blocks": [{"width": 4, "downsample": "none"},
                         {"width": 8, "downsample": "psi"}],
              "batch_norm": False},
    "aux": {"k": 2, "width": 4},
    "train": {"epochs_per_stage": 1, "batch_size": 32},
    "export": {"enabled": False},
}


def derived(change):
    """A deep copy of BASE changed in place by `change(recipe)`."""
    recipe = copy.deepcopy(BASE)
    change(recipe)
    return recipe


def four_psi(r):
    r["model"]["blocks"] = [{"width": 4}] + [{"width": 4, "downsample": "psi"}] * 4


# (id, recipe: dict | str (raw file text) | None (no file), extra argv,
#  expected fragments of the error line; "{recipe}" is the recipe file's path)
SUBPROCESS_CASES = [
    ("unknown-top-level-key", derived(lambda r: r.update(epochs=3)), [],
     ["epochs: unknown key"]),
    ("batch-larger-than-train-set", derived(lambda r: r["train"].update(batch_size=5000)),
     [], ["train.batch_size:", "1437", "received 5000"]),
    ("tfds-not-prepared", derived(lambda r: r["data"].update(
        source="tfds", name="cifar10", data_dir="{tmp}/empty_tfds")), [],
     ["data.data_dir:", "cifar10", "empty_tfds", "received"]),
    ("invalid-json", '{"name": "tiny_digits",\n "seed": 0,,\n}', [],
     ["{recipe}", "not valid JSON", "line 2"]),
]

IN_PROCESS_CASES = [
    ("unknown-nested-key", derived(lambda r: r["model"]["blocks"][1].update(stride=2)), [],
     ["model.blocks[1].stride: unknown key"]),
    ("k-zero", derived(lambda r: r["aux"].update(k=0)), [], ["aux.k:", "received 0"]),
    ("width-zero", derived(lambda r: r["model"]["blocks"][0].update(width=0)), [],
     ["model.blocks[0].width:", "received 0"]),
    ("string-for-int", derived(lambda r: r["train"].update(batch_size="32")), [],
     ["train.batch_size:", "received '32'"]),
    ("unknown-source", derived(lambda r: r["data"].update(source="mnist")), [],
     ["data.source:", "received 'mnist'"]),
    ("image-too-small-for-four-psi", derived(four_psi), [],
     ["model.blocks[", "].downsample", "received 'psi'"]),
    ("image-folder-missing", derived(lambda r: r["data"].update(
        source="image_folder", data_dir="{tmp}/no_such_folder", image_size=8)), [],
     ["data.data_dir:", "received", "no_such_folder"]),
    ("malformed-set", BASE, ["--set", "train.epochs_per_stage"],
     ["--set:", "KEY=VALUE", "received 'train.epochs_per_stage'"]),
    ("epochs-zero", derived(lambda r: r["train"].update(epochs_per_stage=0)), [],
     ["train.epochs_per_stage:", "received 0"]),
    ("true-for-int", derived(lambda r: r.update(seed=True)), [], ["seed:", "received True"]),
    ("unknown-augment", derived(lambda r: r["data"].update(augment="flip")), [],
     ["data.augment:", "received 'flip'"]),
    ("unknown-downsample", derived(lambda r: r["model"]["blocks"][1].update(
        downsample="pool")), [], ["model.blocks[1].downsample:", "received 'pool'"]),
    ("set-list-index-out-of-range", BASE, ["--set", "model.blocks.5.width=8"],
     ["--set:", "model.blocks.5", "2 items", "received 'model.blocks.5.width=8'"]),
    ("set-unknown-key", BASE, ["--set", "train.epoch=3"],
     ["train.epoch: unknown key", "received 3"]),
    ("missing-recipe-file", None, [], ["{recipe}", "not found"]),
]


def write_case(tmp_path, recipe):
    """Writes the recipe file of a case; returns its path (absent for None)."""
    path = tmp_path / "bad.json"
    if isinstance(recipe, dict):
        path.write_text(json.dumps(recipe).replace("{tmp}", str(tmp_path)))
    elif isinstance(recipe, str):
        path.write_text(recipe)
    (tmp_path / "empty_tfds").mkdir()
    return path


def check_error_line(stderr, expected, recipe_path):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("kgreedy: error: "), stderr[-2000:]
    for fragment in expected:
        fragment = fragment.replace("{recipe}", str(recipe_path))
        assert fragment in last, (fragment, last)
    return last


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra,expected",
                         [c[1:] for c in SUBPROCESS_CASES],
                         ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path, recipe, extra,
                                                             expected):
    path = write_case(tmp_path, recipe)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kgreedy.train", str(path), "--output", str(run_dir), *extra],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    check_error_line(proc.stderr, expected, path)
    assert not run_dir.exists()
    # Fails fast: the unprepared TFDS dataset must not be downloaded or retried.
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("recipe,extra,expected",
                         [c[1:] for c in IN_PROCESS_CASES],
                         ids=[c[0] for c in IN_PROCESS_CASES])
def test_bad_recipe_in_process_exits_2(tmp_path, capsys, recipe, extra, expected):
    path = write_case(tmp_path, recipe)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_cli.main, [str(path), "--output", str(run_dir), *extra])
    assert exit_info.value.code == 2
    check_error_line(capsys.readouterr().err, expected, path)
    assert not run_dir.exists()


def test_base_recipe_is_valid_so_each_bad_case_fails_for_its_own_reason(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(BASE))
    recipe = load_recipe(path)
    spec = data.describe(recipe.data)
    check_against_data(recipe, spec.image_shape[0])
    assert spec.image_shape == (8, 8, 1)


# ------------------------------------------------------------------ --set ----

def test_set_overrides_parse_json_else_string(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(BASE))
    recipe = load_recipe(path, ["train.epochs_per_stage=3", "model.blocks.0.width=4",
                                "data.augment=cifar", "description=hello world"])
    assert recipe.train.epochs_per_stage == 3
    assert recipe.model.blocks[0].width == 4
    assert recipe.model.blocks[1].width == 8  # the other item is untouched
    assert recipe.data.augment == "cifar"       # absent from the file, declared: works
    assert recipe.description == "hello world"  # not JSON: taken as a string
    # JSON values keep their JSON type.
    recipe = load_recipe(path, ["model.batch_norm=true", "data.mean=[1.5]",
                                "train.optimizer.learning_rate=0.25",
                                "model.blocks.1.width=16"])
    assert recipe.model.batch_norm is True
    assert recipe.data.mean == (1.5,)
    assert recipe.train.optimizer.learning_rate == 0.25
    assert recipe.model.blocks[1].width == 16
    # A whole object absent from the file is created along the path.
    recipe = load_recipe(path, ["train.lr_schedule.warmup_epochs=2"])
    assert recipe.train.lr_schedule.warmup_epochs == 2
    assert recipe.train.lr_schedule.name == "step"  # the rest keeps its defaults
    # The file itself is not modified.
    assert json.loads(path.read_text()) == BASE


@pytest.mark.parametrize("override,path", [
    ("train.epoch=3", "train.epoch"),
    ("aux.depth.inner=1", "aux.depth"),
    ("colour=red", "colour"),
])
def test_set_unknown_dotted_key_raises_recipe_error_naming_it(tmp_path, override, path):
    recipe_path = tmp_path / "r.json"
    recipe_path.write_text(json.dumps(BASE))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_path, [override])
    assert info.value.path == path
    assert str(info.value).startswith(path + ": unknown key")


def test_set_wrong_type_and_malformed(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(BASE))
    with pytest.raises(RecipeError, match=r"^train\.epochs_per_stage: .*received 'three'"):
        load_recipe(path, ["train.epochs_per_stage=three"])
    with pytest.raises(KgreedyError, match=r"^overrides: .*received 'no_equals_sign'"):
        load_recipe(path, ["no_equals_sign"])
    with pytest.raises(KgreedyError, match=r"^overrides: .*model\.blocks\.2"):
        load_recipe(path, ["model.blocks.2.width=3"])


# ------------------------------------------------------------- round trip ----

@pytest.mark.parametrize("name", ["quickstart", "cifar10_k1", "cifar10_k2", "cifar10_k3"])
def test_shipped_recipes_round_trip(name):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.json")
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe
    assert json.loads(json.dumps(recipe.to_dict())) == recipe.to_dict()


def test_resolved_recipe_with_overrides_round_trips(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(BASE))
    recipe = load_recipe(path, ["data.mean=[1, 2.5, 3]", "data.std=[3, 4, 5]", "data.channels=3",
                                "distribute.strategy=mirrored",
                                'distribute.devices=["/cpu:0"]', "export.version=7",
                                "description=x y"])
    plain = recipe.to_dict()
    assert plain["data"]["mean"] == [1.0, 2.5, 3.0]
    assert plain["model"]["blocks"][1] == {"width": 8, "downsample": "psi"}
    assert recipe_from_dict(plain) == recipe
    assert recipe_from_dict(json.loads(json.dumps(plain))) == recipe


# ---------------------------------------------------------------- dry run ----

ROW = re.compile(r"^\s*(\d+)\s+(\d+x\d+x\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+(\S.*)$")


def parse_dry_run(stdout):
    rows = []
    for line in stdout.splitlines():
        m = ROW.match(line)
        if m:
            stage, shape, trainable, frozen, deployed, _module = m.groups()
            rows.append({"stage": int(stage), "shape": shape,
                         "trainable": int(trainable.replace(",", "")),
                         "frozen": int(frozen.replace(",", "")),
                         "deployed": int(deployed.replace(",", ""))})
    deployed = re.findall(r"^deployed model.*?([\d,]+) parameters \(", stdout, re.M)
    return rows, [int(d.replace(",", "")) for d in deployed]


def conv3x3(cin, cout, batch_norm):
    return 9 * cin * cout + (0 if batch_norm else cout)


def bn(c, batch_norm, trainable_only):
    """gamma, beta (trainable) + moving mean, moving variance (not trainable)."""
    if not batch_norm:
        return 0
    return 2 * c if trainable_only else 4 * c


def hand_counts(in_channels, blocks, k, aux_width, classes, batch_norm, size):
    """Per-stage parameter counts, by hand, for a trunk of conv3x3 blocks.

    Block j: [psi: channels x4, side /2] -> conv3x3 cin->width [+BN(width)].
    Head j: k-1 conv3x3 of the aux width (doubled at every downsampling so far, as
    network.head_widths) [+BN], adaptive average pool to 2x2, [BN], dense
    2*2*c*classes + classes.
    trainable: what stage j's optimizer updates (block j + head j, BN moving stats
    excluded); frozen: every weight of blocks 1..j-1; deployed: every weight of
    blocks 1..j and head j.
    """
    rows, frozen, channels, width_aux = [], 0, in_channels, aux_width
    for j, (width, downsample) in enumerate(blocks, start=1):
        assert downsample in ("none", "psi")
        if downsample == "psi":
            channels, size, width_aux = channels * 4, size // 2, width_aux * 2

        def block(t):
            return conv3x3(channels, width, batch_norm) + bn(width, batch_norm, t)

        def head(t):
            total, c = 0, width
            for _ in range(k - 1):
                total += conv3x3(c, width_aux, batch_norm) + bn(width_aux, batch_norm, t)
                c = width_aux
            return total + bn(c, batch_norm, t) + 2 * 2 * c * classes + classes

        rows.append({"stage": j, "shape": f"{size}x{size}x{width}",
                     "trainable": block(True) + head(True), "frozen": frozen,
                     "deployed": frozen + block(False) + head(False)})
        frozen += block(False)
        channels = width
    return rows


def expected_counts(batch_norm):
    """BASE on digits (8x8x1, 10 classes): blocks 4@8x8, psi 8@4x4; k=2, aux width 4."""
    return hand_counts(1, [(4, "none"), (8, "psi")], k=2, aux_width=4, classes=10,
                       batch_norm=batch_norm, size=8)


def test_expected_counts_arithmetic_written_out():
    # The digits numbers as plain arithmetic, so a slip in the helpers shows up.
    # No BN: convs have a bias.
    block1 = 9 * 1 * 4 + 4            # 40: conv3x3 1->4
    head1 = (9 * 4 * 4 + 4            # 148: head conv3x3 4->4 (aux width 4)
             + 2 * 2 * 4 * 10 + 10)   # 170: dense on the 2x2x4 pooled map
    block2 = 9 * (4 * 4) * 8 + 8      # 1160: psi makes 16 channels, conv3x3 16->8
    head2 = (9 * 8 * 8 + 8            # 584: head conv3x3 8->8 (aux width doubled)
             + 2 * 2 * 8 * 10 + 10)   # 330
    assert expected_counts(False) == [
        {"stage": 1, "shape": "8x8x4", "trainable": block1 + head1, "frozen": 0,
         "deployed": block1 + head1},
        {"stage": 2, "shape": "4x4x8", "trainable": block2 + head2, "frozen": block1,
         "deployed": block1 + block2 + head2},
    ]
    assert [r["deployed"] for r in expected_counts(False)] == [358, 2114]
    # BN: no conv bias; each BN(c) has 4c weights (gamma, beta, moving mean/var),
    # 2c of them trainable. Heads have a BN after each conv and after the pool.
    block1_t, block1_all = 9 * 1 * 4 + 2 * 4, 9 * 1 * 4 + 4 * 4                # 44, 52
    head1_t = 9 * 4 * 4 + 2 * 4 + 2 * 4 + 2 * 2 * 4 * 10 + 10                   # 330
    head1_all = 9 * 4 * 4 + 4 * 4 + 4 * 4 + 2 * 2 * 4 * 10 + 10                 # 346
    block2_t, block2_all = 9 * 16 * 8 + 2 * 8, 9 * 16 * 8 + 4 * 8               # 1168, 1184
    head2_t = 9 * 8 * 8 + 2 * 8 + 2 * 8 + 2 * 2 * 8 * 10 + 10                   # 938
    head2_all = 9 * 8 * 8 + 4 * 8 + 4 * 8 + 2 * 2 * 8 * 10 + 10                 # 970
    assert expected_counts(True) == [
        {"stage": 1, "shape": "8x8x4", "trainable": block1_t + head1_t, "frozen": 0,
         "deployed": block1_all + head1_all},
        {"stage": 2, "shape": "4x4x8", "trainable": block2_t + head2_t,
         "frozen": block1_all, "deployed": block1_all + block2_all + head2_all},
    ]
    assert [r["deployed"] for r in expected_counts(True)] == [398, 2206]


@pytest.mark.slow
@pytest.mark.parametrize("batch_norm", [False, True], ids=["no-bn", "bn"])
def test_dry_run_prints_hand_counted_parameters_and_writes_nothing(tmp_path, batch_norm):
    (tmp_path / "recipe.json").write_text(json.dumps(BASE))
    extra = ["--set", "model.batch_norm=true"] if batch_norm else []
    proc = subprocess.run(
        [sys.executable, "-m", "kgreedy.train", "recipe.json", "--dry-run", *extra],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["recipe.json"]  # no runs/, nothing else
    rows, deployed = parse_dry_run(proc.stdout)
    expected = expected_counts(batch_norm)
    assert rows == expected, proc.stdout
    assert deployed == [expected[-1]["deployed"]], proc.stdout


@pytest.mark.slow
def test_dry_run_cifar10_k3_needs_no_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kgreedy.train", str(ROOT / "recipes" / "cifar10_k3.json"),
         "--dry-run"],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []
    rows, deployed = parse_dry_run(proc.stdout)
    assert [r["stage"] for r in rows] == [1, 2, 3, 4], proc.stdout
    assert [r["shape"] for r in rows] == ["32x32x128", "32x32x128", "16x16x256", "16x16x256"]
    # 128@32, 128@32, psi 256@16, 256@16, BN; k=3 (two head convs), aux width 128
    # doubled to 256 after the downsampling; 10 classes.
    assert rows == hand_counts(3, [(128, "none"), (128, "none"), (256, "psi"),
                                   (256, "none")], k=3, aux_width=128, classes=10,
                               batch_norm=True, size=32), proc.stdout
    assert deployed == [rows[-1]["deployed"]]
    assert "deployed model" in proc.stdout


def per_stage_recipe(per_stage):
    return recipe_from_dict({"name": "ps", "model": {"blocks": [
        {"width": 4}, {"width": 4, "downsample": "psi"}]}, "aux": {"per_stage": per_stage}})


def test_aux_per_stage_is_checked_against_the_stages_and_feature_maps():
    with pytest.raises(RecipeError, match=r"aux.per_stage: has more entries than the 2 "
                                          r"stages.*received 3"):
        per_stage_recipe([{}, {}, {}])
    # Digits are 8x8: block 2's map is 4x4, too small for a pool of 8.
    with pytest.raises(RecipeError, match=r"aux.per_stage\[1\].pool_size: the feature map "
                                          r"after block 2 is 4x4.*received 8"):
        check_against_data(per_stage_recipe([{}, {"pool_size": 8}]), 8)
    check_against_data(per_stage_recipe([{"pool_size": 4}]), 8)  # 8x8 after block 1: fits


def test_resume_accepts_a_run_whose_recipe_json_predates_new_keys(tmp_path):
    recipe = recipe_from_dict({"name": "old", "model": {"blocks": [{"width": 4}]}})
    saved = recipe.to_dict()
    del saved["train"]["cache_features"]  # as written before the key existed
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    def compare(r):
        run.compare_record(str(tmp_path / "recipe.json"), r.to_dict(), what="recipe",
                           normalize=lambda saved: recipe_from_dict(saved).to_dict())

    compare(recipe)  # no error
    changed = recipe_from_dict({"name": "old", "model": {"blocks": [{"width": 8}]}})
    with pytest.raises(KgreedyError, match=r"this recipe differs .* in \['model'\]"):
        compare(changed)

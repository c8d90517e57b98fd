"""Recipes that bring their own network (docs/DESIGN.md, "Contracts"): a named ResNet,
a keras.applications constructor or a saved .keras file split into modules
(`model.modules`, `model.split_at`). A model that cannot be loaded or split, like any
bad recipe, exits with status 2 and one `kgreedy: error:` line naming the key, the
layer and the connection, and writes nothing; a split model trains greedily and
exports the user's network itself (`aux.last_head: model`)."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from kgreedy import cli
from kgreedy import train as train_cli
from kgreedy.base.errors import RecipeError
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.training.rundir import load_trained

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


# ---------------------------------------------------------- saved models ----

def tiny_residual(classes=10, softmax=False, shape=(8, 8, 1)):
    """A small classifier for digits (8x8x1): stem conv-BN-ReLU, a residual block
    (b1_add reads stem_relu), a strided conv, pool and linear."""
    inputs = keras.Input(shape, name="images")
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="b1_conv")(x)
    y = keras.layers.BatchNormalization(name="b1_bn")(y)
    x = keras.layers.Add(name="b1_add")([x, y])
    x = keras.layers.ReLU(name="b1_out")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                            name="b2_conv")(x)
    x = keras.layers.BatchNormalization(name="b2_bn")(x)
    x = keras.layers.ReLU(name="b2_out")(x)
    if classes:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, activation="softmax" if softmax else None,
                               name="predictions")(x)
    return keras.Model(inputs, x, name="tiny_residual")


def two_inputs():
    a, b = keras.Input((8, 8, 1), name="a"), keras.Input((8, 8, 1), name="b")
    x = keras.layers.Conv2D(4, 3, padding="same", name="ca")(a)
    y = keras.layers.Conv2D(4, 3, padding="same", name="cb")(b)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model([a, b], keras.layers.Dense(10, name="predictions")(x), name="two")


def with_lambda():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="predictions")(x), name="lam")


MODELS = {"tiny.keras": tiny_residual, "trunk.keras": lambda: tiny_residual(classes=None),
          "softmax.keras": lambda: tiny_residual(softmax=True),
          "five.keras": lambda: tiny_residual(classes=5),
          "rgb.keras": lambda: tiny_residual(shape=(16, 16, 3)),
          "two_inputs.keras": two_inputs, "lambda.keras": with_lambda}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folder of the saved models of MODELS."""
    folder = tmp_path_factory.mktemp("models")
    for name, build in MODELS.items():
        build().save(str(folder / name))
    (folder / "weights.h5").write_bytes(b"not a keras file")
    return folder


def file_recipe(folder, name="tiny.keras", **model):
    """A digits recipe splitting saved model `name` (2 balanced modules unless
    `model` says otherwise), keeping its classifier, exporting nothing."""
    model = {"keras_file": str(folder / name), **model}
    if "split_at" not in model and "modules" not in model:
        model["modules"] = 2
    return {"name": "byo", "seed": 0, "data": {"source": "digits"}, "model": model,
            "aux": {"k": 1, "width": "auto", "pool_size": 2, "last_head": "model"},
            "train": {"epochs_per_stage": 1, "batch_size": 32, "steps_per_epoch": 2},
            "export": {"enabled": False}}


def edit(recipe, change):
    recipe = copy.deepcopy(recipe)
    change(recipe)
    return recipe


def error_line(stderr):
    """The one line a refused recipe prints (nothing else on stderr)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("kgreedy: error: "), lines
    return lines[0]


def run_in_process(tmp_path, capsys, recipe, extra=()):
    """`python -m kgreedy.train recipe.json --output run` in this process: the
    error line (exit 2), after checking that no run directory was made."""
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    run_dir = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train_cli.main, [str(path), "--output", str(run_dir), *extra])
    assert exit_info.value.code == 2
    assert not run_dir.exists()
    assert sorted(os.listdir(tmp_path)) == ["recipe.json"]
    return error_line(capsys.readouterr().err)


# ------------------------------------------------------------- recipes ----

RESNET = {"name": "r", "data": {"source": "digits"},
          "model": {"architecture": "resnet20", "modules": 3}}

# (id, recipe change, expected fragments of the RecipeError)
RECIPE_CASES = [
    ("blocks-and-resnet32",
     lambda r: r["model"].update(architecture="resnet32", blocks=[{"width": 4}]),
     ["model.blocks: architecture 'resnet32' is split into modules", "leave them out"]),
    ("application-and-file",
     lambda r: r["model"].update(architecture=None, keras_application="ResNet50",
                                 keras_file="/x/m.keras"),
     ["model.keras_file: a recipe names one model; it also has model.keras_application",
      "received '/x/m.keras'"]),
    ("neither-modules-nor-split-at", lambda r: r["model"].pop("modules"),
     [re.compile(r"^model\.(modules|split_at): .*model\.modules.*model\.split_at")]),
    ("both-modules-and-split-at",
     lambda r: r["model"].update(split_at=["conv2_block3_out"]),
     [re.compile(r"^model\.(modules|split_at): .*model\.modules.*model\.split_at"),
      re.compile(r"received (3|\['conv2_block3_out'\]|\('conv2_block3_out',\))$")]),
    ("last-head-model-with-blocks",
     lambda r: r.update(model={"blocks": [{"width": 4}]}, aux={"last_head": "model"}),
     ["aux.last_head: 'model' keeps a split model's own classifier; model.blocks has none"]),
    ("split-at-with-blocks",
     lambda r: r.update(model={"blocks": [{"width": 4}], "split_at": ["x"]}),
     ["model.split_at: splits a residual architecture", "received ('x',)"]),
    ("modules-with-blocks",
     lambda r: r.update(model={"blocks": [{"width": 4}], "modules": 2}),
     ["model.modules: splits a residual architecture", "received 2"]),
    ("balanced-memory-with-split-at",
     lambda r: r["model"].update(modules=None, split_at=["conv2_block3_out"],
                                 balanced_memory=True),
     ["model.balanced_memory: only applies to model.modules"]),
    ("application-not-a-name",
     lambda r: r["model"].update(architecture=None, keras_application="os.system"),
     ["model.keras_application: must be the name of a keras.applications constructor",
      "received 'os.system'"]),
    ("unknown-architecture", lambda r: r["model"].update(architecture="resnet18x"),
     ["model.architecture:", "'resnet20'", "'resnet50'", "received 'resnet18x'"]),
    ("width-wide", lambda r: r.update(aux={"width": "wide"}),
     ["aux.width:", "auto", "received 'wide'"]),
    ("width-zero", lambda r: r.update(aux={"width": 0}), ["aux.width:", "received 0"]),
    ("per-stage-longer-than-modules", lambda r: r.update(aux={"per_stage": [{}] * 4}),
     ["aux.per_stage: has more entries than the 3 stages of the model", "received 4"]),
    ("per-stage-longer-than-split-at",
     lambda r: r.update(model={"architecture": "resnet20",
                               "split_at": ["conv2_block3_out"]},
                        aux={"per_stage": [{}] * 3}),
     ["aux.per_stage: has more entries than the 2 stages", "received 3"]),
    ("modules-zero", lambda r: r["model"].update(modules=0),
     ["model.modules:", "received 0"]),
    ("last-head-unknown", lambda r: r.update(aux={"last_head": "own"}),
     ["aux.last_head:", "'model'", "received 'own'"]),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in RECIPE_CASES],
                         ids=[c[0] for c in RECIPE_CASES])
def test_bad_split_recipes_are_refused_naming_the_key(change, expected):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(edit(RESNET, change))
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected:
        if isinstance(fragment, str):
            assert fragment in message, (fragment, message)
        else:
            assert fragment.search(message), (fragment.pattern, message)


def test_split_recipes_resolve_stages_and_round_trip():
    recipe = recipe_from_dict(RESNET)
    assert recipe.split and recipe.num_stages == 3
    assert recipe.aux.width == "auto"  # a residual architecture's default
    assert recipe_from_dict(recipe.to_dict()) == recipe
    recipe = recipe_from_dict(edit(RESNET, lambda r: r["model"].update(
        modules=None, split_at=["conv2_block3_out", "conv3_block3_out", "conv4_block1_out"]),
        ))
    assert recipe.num_stages == 4 and recipe.model.split_at[0] == "conv2_block3_out"
    assert recipe_from_dict(recipe.to_dict()) == recipe
    shipped = load_recipe(ROOT / "recipes" / "resnet32_cifar10_k4.json")
    assert shipped.split and shipped.num_stages == 4
    assert shipped.aux.last_head == "model"
    assert recipe_from_dict(shipped.to_dict()) == shipped
    blocks = recipe_from_dict({"name": "b", "model": {"blocks": [{"width": 4}]}})
    assert not blocks.split and blocks.num_stages == 1


def test_recipe_errors_exit_2_in_one_line_from_the_command_line(tmp_path, capsys):
    line = run_in_process(tmp_path, capsys, edit(RESNET, lambda r: r.update(
        aux={"width": "wide"})))
    assert "aux.width:" in line and "received 'wide'" in line
    os.remove(tmp_path / "recipe.json")
    line = run_in_process(tmp_path, capsys, edit(RESNET, lambda r: r["model"].update(
        blocks=[{"width": 4}])))
    assert line.startswith("kgreedy: error: model.blocks: architecture 'resnet20'")


# ------------------------------------------------ models that do not load ----

# (id, recipe from the saved-models folder, expected fragments of the error line)
MODEL_CASES = [
    ("split-at-crossed-by-a-skip",
     lambda f: file_recipe(f, split_at=["b1_conv"]),
     ["model.split_at[0]: layer 'b1_conv' is not a split point: 'b1_add' reads "
      "'stem_relu', which comes before it (a skip connection"]),
    ("split-at-unknown-layer", lambda f: file_recipe(f, split_at=["conv9"]),
     ["model.split_at[0]: no layer of that name in model 'tiny_residual",
      "(its layers: stem_conv, ", "received 'conv9'"]),
    ("split-at-out-of-order", lambda f: file_recipe(f, split_at=["b1_out", "stem_relu"]),
     ["model.split_at[1]: 'stem_relu' comes before 'b1_out'"]),
    ("more-modules-than-places", lambda f: file_recipe(f, modules=5),
     ["model.modules: model 'tiny_residual' has 2 places to split",
      "at most 3 modules; received 5"]),
    ("two-inputs", lambda f: file_recipe(f, "two_inputs.keras"),
     ["model: model 'two' has 2 inputs and 1 outputs; kgreedy splits a chain"]),
    ("lambda-refused-by-safe-mode", lambda f: file_recipe(f, "lambda.keras"),
     ["model.keras_file: Keras cannot load it:", "Lambda", "lambda.keras"]),
    ("no-such-file", lambda f: file_recipe(f, "missing.keras"),
     ["model.keras_file: no such file", "missing.keras"]),
    ("not-a-keras-file", lambda f: file_recipe(f, "weights.h5"),
     ["model.keras_file: must be a .keras file", "weights.h5"]),
    ("input-shape-differs", lambda f: file_recipe(f, "rgb.keras"),
     ["model.keras_file: the model takes inputs of shape (16, 16, 3), the data gives "
      "images of (8, 8, 1)"]),
    ("last-head-model-without-classifier", lambda f: file_recipe(f, "trunk.keras"),
     ["aux.last_head: 'model' needs a classifier of the model's own, and the "
      "model.keras_file model ends in a feature map"]),
    ("classifier-with-softmax", lambda f: file_recipe(f, "softmax.keras"),
     ["aux.last_head: 'model': the last layer of the model.keras_file model "
      "('predictions') applies softmax"]),
    ("classifier-of-other-classes", lambda f: file_recipe(f, "five.keras"),
     ["aux.last_head: 'model': the model.keras_file model's classifier has 5 outputs, "
      "the data 10 classes"]),
    ("head-pool-larger-than-the-map",
     lambda f: edit(file_recipe(f, split_at=["b1_out"]),
                    lambda r: r["aux"].update(pool_size=8, last_head="conv")),
     ["aux.pool_size: module 2 outputs a 4x4 map, smaller than the head's 8x8 pool"]),
    ("stage-pool-larger-than-the-map",
     lambda f: edit(file_recipe(f, split_at=["b1_out"]),
                    lambda r: r["aux"].update(per_stage=[{"pool_size": 16}])),
     ["aux.per_stage[0].pool_size: module 1 outputs a 8x8 map, smaller than the head's "
      "16x16 pool", "received 16"]),
    ("unknown-keras-application",
     lambda f: edit(file_recipe(f), lambda r: r["model"].update(
         keras_file=None, keras_application="ResNet7")),
     ["model.keras_application: is not a keras.applications constructor",
      "received 'ResNet7'"]),
    ("keras-application-too-small-for-digits",
     lambda f: edit(file_recipe(f), lambda r: r["model"].update(
         keras_file=None, keras_application="MobileNetV2")),
     ["model.keras_application: keras.applications.MobileNetV2 cannot be built for "
      "8x8x1 images"]),
]


@pytest.mark.parametrize("make,expected", [c[1:] for c in MODEL_CASES],
                         ids=[c[0] for c in MODEL_CASES])
def test_a_model_that_cannot_be_loaded_or_split_exits_2_and_writes_nothing(
        tmp_path, capsys, saved, make, expected):
    line = run_in_process(tmp_path, capsys, make(saved))
    for fragment in expected:
        assert fragment in line, (fragment, line)
    # --dry-run says the same.
    line = run_in_process(tmp_path, capsys, make(saved), ["--dry-run"])
    for fragment in expected:
        assert fragment in line, (fragment, line)


# ---------------------------------------------------- real command lines ----

ROW = re.compile(r"^\s*(\d+)\s+(\d+x\d+x\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+(\S.*)$")


@pytest.mark.slow
def test_dry_run_resnet32_k4_prints_four_modules_and_resnet32s_count(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kgreedy.train",
         str(ROOT / "recipes" / "resnet32_cifar10_k4.json"), "--dry-run"],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []  # no data needed, nothing written
    rows = [ROW.match(line).groups() for line in proc.stdout.splitlines()
            if ROW.match(line)]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4], proc.stdout
    assert [r[1] for r in rows] == ["32x32x16", "16x16x32", "8x8x64", "8x8x64"]
    # 7 / 8 / 8 / 8 convs: modules end after conv2_block3, conv3_block2, conv4_block1.
    assert [r[5].split(" .. ")[1].split()[0] for r in rows] == [
        "conv2_block3_out", "conv3_block2_out", "conv4_block1_out", "conv4_block5_out"]
    assert rows[0][5].startswith("conv1_conv .. ")
    assert "4 stages" in proc.stdout and "input 32x32x3, 10 classes" in proc.stdout
    # The deployed network is ResNet-32 with its own classifier: 464,154 parameters
    # and the moving mean and variance of its BN layers (2 x 1,136 channels).
    deployed = re.findall(r"^deployed model \(trunk \+ stage 4 head\): ([\d,]+) parameters "
                          r"\(([\d,]+) trainable", proc.stdout, re.M)
    assert deployed == [("466,426", "464,154")], proc.stdout
    assert int(rows[-1][4].replace(",", "")) == 466_426


@pytest.mark.slow
def test_split_at_a_crossed_layer_exits_2_with_one_line_from_the_real_command(
        tmp_path, saved):
    (tmp_path / "recipe.json").write_text(json.dumps(file_recipe(saved,
                                                                 split_at=["b1_bn"])))
    proc = subprocess.run(
        [sys.executable, "-m", "kgreedy.train", "recipe.json", "--output", "run"],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert line == ("kgreedy: error: model.split_at[0]: layer 'b1_bn' is not a split "
                    "point: 'b1_add' reads 'stem_relu', which comes before it (a skip "
                    "connection or branch spans it); received 'b1_bn'")
    assert os.listdir(tmp_path) == ["recipe.json"]  # no run directory


# ------------------------------------------------------------ training ----

def test_a_keras_file_trains_in_two_modules_and_exports_the_users_network(
        tmp_path, saved, capsys):
    user = keras.saving.load_model(str(saved / "tiny.keras"), compile=False)
    recipe = edit(file_recipe(saved), lambda r: r["export"].update(enabled=True))
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    run_dir = tmp_path / "run"
    status = cli.run(train_cli.main, [str(tmp_path / "recipe.json"),
                                      "--output", str(run_dir)])
    assert status == 0, capsys.readouterr().err[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [1, 2]
    assert [s["output_shape"] for s in summary["stages"]] == [[8, 8, 4], [4, 4, 8]]
    final = summary["final"]
    assert final["deployed_params"] == user.count_params()
    path = final["export_path"]
    assert path and os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert Path(path).parent == run_dir / "export" / "byo"

    # The deployed model is the user's network (its layers, its classifier), with
    # the trained weights.
    _, _, net, stage = load_trained(str(run_dir))
    assert stage == 2
    deployed = net.deployed_model()
    assert deployed.count_params() == user.count_params()
    names = {w.path.split("/")[-2] for m in net.modules for w in m.weights}
    assert names == {l.name for l in user.layers if l.weights} - {"predictions"}
    assert net.heads[-1].get_layer("predictions").kernel.shape == (8, 10)
    trained = net.modules[0].get_layer("stem_conv").kernel.numpy()
    assert not np.array_equal(trained, user.get_layer("stem_conv").kernel.numpy())


def test_a_keras_application_gets_kgreedys_batch_norm_momentum(tmp_path):
    """MobileNetV2's BN (momentum 0.999) is set to 0.9 when kgreedy builds it; a
    user's .keras file keeps its own."""
    from kgreedy.model.from_recipe import whole_model
    recipe = recipe_from_dict({"name": "mob", "model": {"keras_application": "MobileNetV2",
                                                        "modules": 2}})
    built = whole_model(recipe, (32, 32, 3), 10)
    momenta = {layer.momentum for layer in built.layers
               if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {0.9}
    path = tmp_path / "own.keras"
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.999)(x)
    keras.Model(inputs, keras.layers.ReLU()(x)).save(path)
    own = whole_model(recipe_from_dict({"name": "own", "model": {
        "keras_file": str(path), "modules": 1}}), (8, 8, 1), 10)
    assert [layer.momentum for layer in own.layers
            if isinstance(layer, keras.layers.BatchNormalization)] == [0.999]

"""GreedyNet.get_config / from_config: a net rebuilt from its config, read back
from JSON, has the same layers, names and parameter counts, and with the same
weights computes the same logits bit for bit."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

import kgreedy
from kgreedy.api import SplitNet
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.network import GreedyNet, parameter_table

ROOT = Path(__file__).resolve().parents[2]


def _names(layer):
    """The layer's name and, for a model, its layers' names in order."""
    return [layer.name, *(x.name for x in getattr(layer, "layers", []))]


def _through_json(net, cls):
    return cls.from_config(json.loads(json.dumps(net.get_config())))


def _assert_same_net(net, clone, images):
    assert type(clone) is type(net)
    assert [_names(m) for m in clone.modules] == [_names(m) for m in net.modules]
    assert [h.name for h in clone.heads] == [h.name for h in net.heads]
    assert [type(h) for h in clone.heads] == [type(h) for h in net.heads]
    assert clone.stage_shapes == net.stage_shapes
    assert parameter_table(clone) == parameter_table(net)
    assert [sorted(p) for p in clone.parts] == [sorted(p) for p in net.parts]
    assert (clone.objective.name, clone.objective.get_config(), clone.objective_stages) \
        == (net.objective.name, net.objective.get_config(), net.objective_stages)
    assert (clone.name, clone.pixel_max, clone.num_classes) == (net.name, net.pixel_max,
                                                                net.num_classes)
    for mine, theirs in zip([*clone.modules, *clone.heads], [*net.modules, *net.heads]):
        assert [w.shape for w in mine.weights] == [w.shape for w in theirs.weights]
        mine.set_weights(theirs.get_weights())
    for stage in range(1, net.num_stages + 1):
        np.testing.assert_array_equal(clone.deployed_model(stage)(images),
                                      net.deployed_model(stage)(images))
    for mine, theirs in zip(clone.all_head_logits(images), net.all_head_logits(images)):
        np.testing.assert_array_equal(mine, theirs)


def _small_model():
    """Conv, a residual block (split points stem, res1), a strided conv-BN, the
    model's own top."""
    inputs = keras.Input((8, 8, 3))
    stem = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    r = keras.layers.Conv2D(8, 3, padding="same", name="res1_conv")(stem)
    h = keras.layers.ReLU(name="res1")(keras.layers.Add(name="res1_add")([stem, r]))
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="down_conv")(h)
    h = keras.layers.BatchNormalization(name="down_bn")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.ReLU(name="down")(h))
    return keras.Model(inputs, keras.layers.Dense(5, name="logits")(h), name="small")


def test_a_split_net_rebuilds_from_its_config():
    keras.utils.set_random_seed(0)
    net = kgreedy.split(_small_model(), at=["stem", "res1"], num_classes=5,
                        head=[kgreedy.heads.Conv(k=2, width=4, reduction=2),
                              kgreedy.heads.MlpSr(width="auto"), kgreedy.heads.Linear()],
                        last_head="model", mean=[1.0, 2.0, 3.0], std=4.0,
                        class_names=list("abcde"), batch_norm_momentum=0.5,
                        objective="infopro", objective_weights=((1, 0), (0.5, 1)),
                        pixel_max=16)
    clone = _through_json(net, SplitNet)
    images = np.random.default_rng(0).uniform(0, 16, (3, 8, 8, 3)).astype("float32")
    _assert_same_net(net, clone, images)
    assert clone.spec == net.spec  # shape, classes, mean, std and class names
    assert clone.modules[2].get_layer("down_bn").momentum == 0.5
    assert clone.heads[-1].name == net.heads[-1].name and clone.heads[-1].name.endswith("_top")


def test_a_recipe_net_rebuilds_from_its_config():
    recipe = recipe_from_dict({
        "name": "cfg", "aux": {"k": 2, "width": 4, "per_stage": [{"head": "linear"},
                                                                {"head": "mlp_sr"}]},
        "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"},
                             {"width": 8, "downsample": "maxpool"}]}})
    net = from_recipe(recipe, (8, 8, 1), 10, [3.0], [5.0])
    clone = _through_json(net, GreedyNet)
    images = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 1)).astype("float32")
    _assert_same_net(net, clone, images)


def test_a_resnet_recipe_rebuilds_in_a_fresh_process(tmp_path):
    # A fresh process has imported no kgreedy module that registers the ResNets'
    # own layers (ZeroPadShortcut): from_config alone must find them.
    recipe = recipe_from_dict({"name": "r20", "model": {"architecture": "resnet20",
                                                        "modules": 3},
                               "aux": {"objective": "infopro_contrast"}})
    net = from_recipe(recipe, (8, 8, 3), 10, [1.0] * 3, [2.0] * 3)
    (tmp_path / "net.json").write_text(json.dumps(net.get_config()))
    code = ("import json, sys\n"
            "from kgreedy.model.network import GreedyNet, parameter_table\n"
            "net = GreedyNet.from_config(json.load(open(sys.argv[1])))\n"
            "print(json.dumps([net.objective.name, parameter_table(net)]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "net.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, table = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == "infopro_contrast" and table == parameter_table(net)

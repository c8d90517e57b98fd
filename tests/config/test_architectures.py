"""Named architectures (paper CIFAR-10/ImageNet models, VGG-11), the head ensemble,
and the manual-download error for ImageNet.

Parameter counts are derived here from the layer shapes the paper and VGG describe,
not read back from the code under test.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kgreedy.base.errors import DataError, RecipeError
from kgreedy.config import architectures
from kgreedy.config.data_checks import check_against_data
from kgreedy.config.recipe import load_recipe, recipe_from_dict
from kgreedy.data.tfds import manual_dir
from kgreedy.model.ensemble import evaluate_heads
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.network import ensemble_weights, parameter_table

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


def _net(recipe, size, channels=3, classes=10):
    return from_recipe(recipe, (size, size, channels), classes, [0.0] * channels,
                     [1.0] * channels)


def _trainable(layer):
    return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


# Trainable parameter counts from layer shapes (BN: gamma and beta; moving
# statistics are not parameters).

def conv(cin, cout, bias):
    return 9 * cin * cout + (cout if bias else 0)


def bn(c):
    return 2 * c


def paper_stage_counts(in_channels, blocks, k, widths, classes, batch_norm):
    """(block params, head params) per stage of a psi/none trunk with conv heads."""
    rows, c = [], in_channels
    for (width, down), w in zip(blocks, widths):
        cin = 4 * c if down == "psi" else c
        block = conv(cin, width, not batch_norm) + (bn(width) if batch_norm else 0)
        head, hc = 0, width
        for _ in range(k - 1):
            head += conv(hc, w, not batch_norm) + (bn(w) if batch_norm else 0)
            hc = w
        head += (bn(hc) if batch_norm else 0) + 4 * hc * classes + classes
        rows.append((block, head))
        c = width
    return rows


@pytest.mark.parametrize("k", [2, 3])
def test_paper_cifar10_k2_k3_parameter_counts(k):
    recipe = recipe_from_dict({"name": "c", "model": {"architecture": "paper_cifar10"},
                               "aux": {"k": k}})
    assert [(b.width, b.downsample) for b in recipe.model.blocks] == [
        (128, "none"), (128, "none"), (256, "psi"), (256, "none")]
    assert recipe.model.batch_norm
    net = _net(recipe, 32)
    expected = paper_stage_counts(3, [(128, "none"), (128, "none"), (256, "psi"),
                                      (256, "none")], k, [128, 128, 256, 256], 10, True)
    got = [(_trainable(b), _trainable(h)) for b, h in zip(net.modules, net.heads)]
    assert got == expected
    assert [r["trainable_params"] for r in parameter_table(net)] == [a + b for a, b in expected]


def test_paper_cifar10_k1_is_the_wide_trunk_without_bn():
    recipe = recipe_from_dict({"name": "c", "model": {"architecture": "paper_cifar10"},
                               "aux": {"k": 1}})
    assert [b.width for b in recipe.model.blocks] == [256, 512, 512, 1024, 1024]
    assert not recipe.model.batch_norm
    # The shipped hand-written recipe and the named architecture agree.
    shipped = load_recipe(ROOT / "recipes" / "cifar10_k1.json")
    assert shipped.model.blocks == recipe.model.blocks


@pytest.mark.slow
def test_paper_imagenet_k3_parameter_counts():
    recipe = recipe_from_dict({"name": "i", "model": {"architecture": "paper_imagenet"},
                               "aux": {"k": 3, "last_width": 1024}})
    blocks = [(128, "psi"), (128, "none"), (256, "psi"), (256, "none"), (512, "psi"),
              (512, "none"), (1024, "psi"), (1024, "none")]
    assert [(b.width, b.downsample) for b in recipe.model.blocks] == blocks
    # Auxiliary width 256 at block 1 (the input psi does not double it), doubled at
    # blocks 3, 5, 7; the last head's width is the paper's M~_f.
    widths = [256, 256, 512, 512, 1024, 1024, 2048, 1024]
    net = _net(recipe, 224, classes=1000)
    expected = paper_stage_counts(3, blocks, 3, widths, 1000, True)
    got = [(_trainable(b), _trainable(h)) for b, h in zip(net.modules, net.heads)]
    assert got == expected
    shapes = [tuple(s) for s in net.stage_shapes]
    assert shapes[0] == (112, 112, 128) and shapes[-1] == (14, 14, 1024)


def test_paper_imagenet_k1_shapes_and_no_bn():
    recipe = recipe_from_dict({"name": "i", "model": {"architecture": "paper_imagenet"},
                               "aux": {"k": 1}})
    assert not recipe.model.batch_norm
    sides, side = [], 224
    for b in recipe.model.blocks:
        side //= 2 if b.downsample != "none" else 1
        sides.append((side, b.width))
    assert sides == [(112, 256), (112, 256), (56, 512), (28, 1024), (14, 2048), (14, 2048),
                     (7, 4096), (7, 4096)]


VGG11_BN_PARAMS = 132_868_840  # torchvision.models.vgg11_bn(), 1000 classes


@pytest.mark.slow
def test_vgg11_deployed_model_is_vgg11_bn():
    recipe = recipe_from_dict({"name": "v", "model": {"architecture": "vgg11"},
                               "aux": {"k": 3}})
    net = _net(recipe, 224, classes=1000)
    model = net.deployed_model()
    kernels = [tuple(w.shape) for w in model.trainable_weights if w.path.endswith("kernel")]
    cfg = [64, 128, 256, 256, 512, 512, 512, 512]
    convs = [(3, 3, cin, cout) for cin, cout in zip([3] + cfg[:-1], cfg)]
    assert kernels == convs + [(512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]
    # Every conv has a bias before its BN, as torchvision's vgg11_bn.
    biases = [tuple(w.shape) for w in model.trainable_weights
              if w.path.endswith("bias") and "conv" in w.path]
    assert biases == [(c,) for c in cfg]
    expected = (sum(conv(cin, cout, True) + bn(cout) for cin, cout in zip([3] + cfg[:-1], cfg))
                + 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000)
    assert expected == VGG11_BN_PARAMS
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == VGG11_BN_PARAMS
    assert tuple(net.stage_shapes[-1]) == (14, 14, 512)
    # Auxiliary heads of stages 1-7: the map halved, two convs twice as wide as the block.
    assert net.heads[0].conv1.conv.kernel.shape == (3, 3, 64, 128)
    assert net.heads[0].reduce is not None and net.heads[6].width == 1024


@pytest.mark.slow
def test_vgg11_cifar10_head_and_size_check():
    recipe = load_recipe(ROOT / "recipes" / "vgg11_cifar10.json")
    net = _net(recipe, 32)
    assert net.heads[-1].fc1.kernel.shape == (512, 4096)
    out = net.deployed_model()(tf.zeros([2, 32, 32, 3]))
    assert tuple(out.shape) == (2, 10)
    small = recipe_from_dict({**recipe.to_dict(), "aux": {**recipe.to_dict()["aux"],
                                                          "pool_size": 1}})
    check_against_data(small, 32)
    with pytest.raises(RecipeError, match=r"^aux\.last_head: .*1x1 map, which needs at "
                                          r"least 2x2 \(image_size 16\)"):
        check_against_data(small, 16)


def test_architecture_blocks_that_disagree_are_refused():
    recipe = recipe_from_dict({"name": "c", "model": {"architecture": "paper_cifar10"}})
    # The resolved recipe (as recipe.json stores it) loads again unchanged.
    assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    with pytest.raises(RecipeError, match=r"^model\.blocks: differ from architecture"):
        recipe_from_dict({"name": "c", "model": {"architecture": "paper_cifar10",
                                                 "blocks": [{"width": 8}]}})
    with pytest.raises(RecipeError, match=r"^model\.architecture: must be one of .*"
                                          r"received 'resnet51'"):
        recipe_from_dict({"name": "c", "model": {"architecture": "resnet51"}})
    with pytest.raises(RecipeError, match=r"^model\.blocks: needs at least one block"):
        recipe_from_dict({"name": "c", "model": {}})
    # A key the recipe sets wins over the architecture's default.
    plain = recipe_from_dict({"name": "c", "model": {"architecture": "paper_cifar10",
                                                     "batch_norm": False}})
    assert not plain.model.batch_norm
    assert set(architectures.ARCHITECTURES) == {"paper_cifar10", "paper_imagenet", "vgg11"}


# ------------------------------------------------------------ ensemble ----

def _tiny(stages=3, **extra):
    blocks = [{"width": 4}, {"width": 8, "downsample": "psi"},
              {"width": 8, "downsample": "psi"}][:stages]
    return recipe_from_dict({"name": "e", "model": {"blocks": blocks}, "aux": {"k": 2,
                             "width": 4}, **extra})


def test_ensemble_weights_are_the_papers_normalised():
    assert ensemble_weights(3) == pytest.approx([2 / 14, 4 / 14, 8 / 14])
    assert ensemble_weights(1) == [1.0]


def test_ensemble_model_and_head_scores():
    tf.random.set_seed(1)
    net = _net(_tiny(), 8, channels=1)
    images = tf.random.uniform([12, 8, 8, 1], 0, 16)
    per_head = [net.deployed_model(j)(images).numpy() for j in (1, 2, 3)]
    ensemble = net.deployed_model(heads="ensemble")(images).numpy()
    manual = sum(w * z for w, z in zip([2 / 14, 4 / 14, 8 / 14], per_head))
    np.testing.assert_allclose(ensemble, manual, rtol=1e-5, atol=1e-5)
    # Labels chosen so head 1 is right everywhere and the others where they agree.
    labels = per_head[0].argmax(-1).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(5)
    scores = evaluate_heads(net, dataset)
    assert scores["val_examples"] == 12
    assert scores["head_val_accuracies"][0] == 1.0
    for j in (1, 2):
        assert scores["head_val_accuracies"][j] == pytest.approx(
            float(np.mean(per_head[j].argmax(-1) == labels)))
    assert scores["ensemble_val_accuracy"] == pytest.approx(
        float(np.mean(manual.argmax(-1) == labels)))


def test_ensemble_export_needs_a_greedy_run():
    with pytest.raises(RecipeError, match=r"^export\.heads: 'ensemble' needs train\.mode"):
        _tiny(train={"mode": "end_to_end"}, export={"heads": "ensemble"})


# ----------------------------------------------------- recipes, ImageNet ----

TRAIN_RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.json"))


@pytest.mark.slow
def test_every_shipped_recipe_dry_runs(tmp_path):
    """`--dry-run` of every recipe in recipes/ in one process (CLI, no data needed)."""
    # Memory left unknown, so no recipe is refused on a small machine (the ImageNet
    # recipes at batch 256 need 15-24 GB: docs/command-line.md, --dry-run).
    code = ("import sys\nfrom kgreedy import cli, train\n"
            "from kgreedy.base import machine\n"
            "machine.MEMINFO = machine.CGROUP_V1 = machine.CGROUP_V2 = '/nonexistent'\n"
            "for name in sys.argv[1:]:\n"
            "    print('RECIPE', name, flush=True)\n"
            "    status = cli.run(train.main, [name, '--dry-run'])\n"
            "    assert status == 0, name\n")
    paths = [str(ROOT / "recipes" / n) for n in TRAIN_RECIPES]
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("deployed model (trunk") == len(TRAIN_RECIPES)
    assert proc.stdout.count("memory: largest stage ") == len(TRAIN_RECIPES)
    for name in ("vgg11.json", "vgg11_end_to_end.json"):
        section = proc.stdout.split(f"RECIPE {ROOT / 'recipes' / name}")[1].split("RECIPE")[0]
        assert "224x224x3, 1000 classes" in section and "14x14x512" in section
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_vgg11_without_imagenet_fails_fast_with_the_manual_download_steps(tmp_path):
    data_dir = tmp_path / "tfds"
    start = time.monotonic()
    proc = subprocess.run(
        # A small batch: at 256 the memory check may refuse first on a busy machine
        # (19 GB of activations), and the data's error is what this test is about.
        [sys.executable, "-m", "kgreedy.train", str(ROOT / "recipes" / "vgg11.json"),
         "--set", f"data.data_dir={data_dir}", "--set", "train.batch_size=8",
         "--output", str(tmp_path / "run")],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=180)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("kgreedy: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    folder = os.path.join(str(data_dir), "downloads", "manual")
    assert folder in lines[0]
    assert "ILSVRC2012_img_train.tar" in lines[0] and "ILSVRC2012_img_val.tar" in lines[0]
    assert not (tmp_path / "run").exists()
    assert seconds < 120  # seconds of work (TF import); no download retries


def test_manual_dir_follows_data_dir():
    class Builder:
        _data_dir_root = "/somewhere/tensorflow_datasets"

    class Config:
        data_dir = None

    assert manual_dir(Builder(), Config()) == "/somewhere/tensorflow_datasets/downloads/manual"
    Config.data_dir = "/data/tfds"
    assert manual_dir(Builder(), Config()) == "/data/tfds/downloads/manual"
    assert issubclass(DataError, Exception)

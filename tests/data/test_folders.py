"""Image folders as users have them (kgreedy.data.folders, kgreedy.data.image_cache and the
folder path of kgreedy.data): layouts and split names, a real shuffle, files of
every kind, bad files, the decoded-image cache and the static eval shape."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kgreedy import data
from kgreedy.base.errors import DataError
from kgreedy.config.recipe import DataConfig, recipe_from_dict
from kgreedy.data import folders
from kgreedy.model.from_recipe import from_recipe

ROOT = str(next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file()))


def write_image(path, size=(12, 10), colour=(200, 40, 30), mode="RGB", fmt=None):
    """Writes a solid image of `size` (width, height) with PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, fmt)
    return path


def config(root, **keys):
    return DataConfig(**{"source": "image_folder", "data_dir": str(root),
                         "image_size": 8, **keys})


def layout(root, **keys):
    c = config(root, **keys)
    return folders.find_layout(c.data_dir, c.train_split, c.eval_split, c.eval_fraction)


def make_split(root, split, classes=("cat", "dog"), per_class=3):
    for c in classes:
        for i in range(per_class):
            write_image(root / split / c / f"{c}{i}.png")


# ---------------------------------------------------------------- layouts ----

@pytest.mark.parametrize("name", ["eval", "val", "validation", "test"])
def test_eval_folder_is_found_under_its_common_names(tmp_path, name):
    make_split(tmp_path, "train")
    make_split(tmp_path, name, per_class=2)
    found = layout(tmp_path)
    assert found.classes == ("cat", "dog")
    assert (len(found.train), len(found.eval)) == (6, 4)
    assert found.eval.origin == f"{name}/"


def test_two_eval_folders_are_an_error_naming_both(tmp_path):
    make_split(tmp_path, "train")
    make_split(tmp_path, "val")
    make_split(tmp_path, "test")
    with pytest.raises(DataError, match=r"data.eval_split.*\['val/', 'test/'\]"):
        layout(tmp_path)
    assert layout(tmp_path, eval_split="test").eval.origin == "test/"


def test_split_folders_can_be_named(tmp_path):
    make_split(tmp_path, "training")
    make_split(tmp_path, "holdout", per_class=1)
    found = layout(tmp_path, train_split="training", eval_split="holdout")
    assert (len(found.train), len(found.eval)) == (6, 2)
    with pytest.raises(DataError, match="data.eval_split: no such folder.*'nope'"):
        layout(tmp_path, train_split="training", eval_split="nope")


def test_bare_class_folders_are_split_stratified_and_seeded(tmp_path):
    for c, n in (("ant", 10), ("bee", 20), ("cow", 5)):
        for i in range(n):
            write_image(tmp_path / c / f"{i}.jpg")
    found = folders.find_layout(str(tmp_path), eval_fraction=0.2, seed=1)
    assert found.classes == ("ant", "bee", "cow")
    held = np.bincount(found.eval.labels, minlength=3)
    assert held.tolist() == [2, 4, 1]  # 20 % of each class
    assert len(found.train) == 35 - 7
    assert not set(found.train.paths) & set(found.eval.paths)
    again = folders.find_layout(str(tmp_path), eval_fraction=0.2, seed=1)
    other = folders.find_layout(str(tmp_path), eval_fraction=0.2, seed=2)
    assert again.eval.paths == found.eval.paths
    assert other.eval.paths != found.eval.paths


def test_eval_folder_without_train_is_an_error(tmp_path):
    make_split(tmp_path, "val")
    make_split(tmp_path, "test")
    with pytest.raises(DataError, match="val/, test/ but no train/ folder"):
        layout(tmp_path)


def test_hidden_and_non_image_files_are_ignored_and_nested_images_found(tmp_path):
    make_split(tmp_path, "train")
    make_split(tmp_path, "val", per_class=1)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "train" / "cat" / "._cat0.png").write_bytes(b"\0\0")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("hello")
    write_image(tmp_path / "train" / "dog" / "more" / "deep.JPG")
    found = layout(tmp_path)
    assert found.classes == ("cat", "dog")
    assert len(found.train) == 7
    assert any(p.endswith(os.path.join("more", "deep.JPG")) for p in found.train.paths)


# ----------------------------------------------------------------- shuffle ----

def class_sorted_folder(root, classes=10, per_class=40):
    """A folder whose file list is sorted by class, as every class-foldered set is."""
    for c in range(classes):
        for i in range(per_class):
            write_image(root / "train" / f"c{c}" / f"{i:03d}.png", (4, 4), (c * 20, i, 0))
        write_image(root / "test" / f"c{c}" / "0.png", (4, 4), (c * 20, 0, 0))
    return root


def test_every_batch_is_a_uniform_draw_and_resume_continues_the_order(tmp_path):
    root = class_sorted_folder(tmp_path / "sorted")
    # A shuffle buffer far smaller than the split, as with any large folder.
    c = config(root, image_size=4, shuffle_buffer=16)
    datasets = data.load(c, data.describe(c), batch_size=16, seed=5)
    assert datasets.indexed
    batches = [labels.numpy() for _, labels in datasets.train_for(epoch=3)]
    assert len(batches) == 400 // 16
    for labels in batches[:20]:
        assert len(set(labels.tolist())) >= 5, labels
    every = np.concatenate(batches)
    assert sorted(every.tolist()) == sorted(np.repeat(np.arange(10), 40)[:len(every)]) \
        or len(set(every.tolist())) == 10
    # Entering the epoch at step 7 gives the rest of the same order.
    resumed = [labels.numpy() for _, labels in datasets.train_for(epoch=3, skip_steps=7)]
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(batches[7:]))
    other = np.concatenate([y.numpy() for _, y in datasets.train_for(epoch=4)])
    assert not np.array_equal(other, every)


def test_statistics_and_probe_samples_draw_from_every_class(tmp_path, monkeypatch):
    root = class_sorted_folder(tmp_path / "sorted")
    monkeypatch.setattr(data.datasets, "_STATS_SAMPLE", 40)  # one class's worth of files
    c = config(root, image_size=4)
    datasets = data.load(c, data.describe(c), batch_size=16, seed=0)
    labels = np.concatenate([y.numpy() for _, y in
                             datasets.sample(datasets.train_split, 40, seed=0)])
    assert len(set(labels.tolist())) >= 8
    # Red is 20 x class: the first 40 files alone (class 0) would give a mean of 0.
    assert datasets.spec.mean[0] > 50


# ------------------------------------------------------------- file kinds ----

def write_every_kind(folder):
    """One file of every kind a user's folder may hold; returns the count."""
    rgb = Image.new("RGB", (13, 7), (200, 30, 90))
    kinds = {
        "rgb.jpg": lambda p: rgb.save(p, "JPEG"),
        "grey.jpg": lambda p: rgb.convert("L").save(p, "JPEG"),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, "JPEG"),
        "palette.png": lambda p: rgb.convert("P").save(p),
        "grey_alpha.png": lambda p: rgb.convert("LA").save(p),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "sixteen.png": lambda p: p.write_bytes(tf.io.encode_png(
            tf.fill([7, 13, 1], tf.constant(40000, tf.uint16))).numpy()),
        "photo.bmp": lambda p: rgb.save(p, "BMP"),
        "anim.gif": lambda p: rgb.save(p, "GIF", save_all=True, append_images=[
            Image.new("RGB", (13, 7), (0, 0, 0))]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in kinds.items():
        write(folder / name)
    return len(kinds)


@pytest.mark.parametrize("channels", [1, 3])
def test_files_of_every_kind_decode_to_the_model_channels(tmp_path, channels):
    count = write_every_kind(tmp_path / "train" / "a")
    write_every_kind(tmp_path / "train" / "b")
    write_every_kind(tmp_path / "val" / "a")
    c = config(tmp_path, channels=channels)
    datasets = data.load(c, data.describe(c), batch_size=4)
    assert datasets.spec.num_train == 2 * count and datasets.info["skipped_files"] == 0
    images = np.concatenate([x.numpy() for x, _ in datasets.eval])
    assert images.shape == (count, 8, 8, channels)
    assert images.min() >= 0 and images.max() <= 255


def write_bad_files(folder):
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(good, "JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "text.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")


def test_bad_files_are_left_out_counted_and_named(tmp_path):
    make_split(tmp_path, "train", per_class=4)
    make_split(tmp_path, "val", per_class=1)
    write_bad_files(tmp_path / "train" / "cat")
    c = config(tmp_path)
    spec = data.describe(c)
    assert spec.num_train == 11  # listed: bad files are only found by decoding
    datasets = data.load(c, spec, batch_size=4)
    assert datasets.spec.num_train == 8
    assert datasets.info["skipped_files"] == 3
    assert sorted(datasets.info["skipped_examples"]) == [
        os.path.join("train", "cat", n) for n in ("empty.png", "text.jpg", "truncated.jpg")]
    assert sum(len(y) for _, y in datasets.train_for(0)) == 8


def test_bad_files_error_names_the_file(tmp_path):
    make_split(tmp_path, "train", per_class=4)
    make_split(tmp_path, "val", per_class=1)
    write_bad_files(tmp_path / "train" / "dog")
    c = config(tmp_path, bad_files="error", cache="disk")
    with pytest.raises(DataError, match=r"data.bad_files: cannot decode .*dog.empty\.png"):
        data.load(c, data.describe(c), batch_size=4, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "train").exists()  # nothing half-written


# ------------------------------------------------------------------ cache ----

def photo_folder(root, sizes=((64, 48), (23, 57), (100, 75), (40, 40), (31, 90))):
    """JPEGs of many sizes and aspect ratios with some texture."""
    rng = np.random.default_rng(0)
    for split, per in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            for i in range(per):
                w, h = sizes[(i + len(c)) % len(sizes)]
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                path = root / split / c / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path, "JPEG")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["imagenet", "cifar", "none"])
def test_cache_modes_give_the_same_pixels(tmp_path, augment):
    root = photo_folder(tmp_path / "photos")
    batches = {}
    for mode in ("none", "memory", "disk"):
        c = config(root, image_size=16, augment=augment, cache=mode)
        cache_dir = tmp_path / f"cache_{mode}"
        datasets = data.load(c, data.describe(c), batch_size=4, seed=3,
                             cache_dir=str(cache_dir))
        assert datasets.info["cache"] == mode
        assert (cache_dir / "train").is_dir() == (mode == "disk")
        batches[mode] = ([x.numpy() for x, _ in datasets.train_for(epoch=1)],
                         [x.numpy() for x, _ in datasets.eval], datasets.spec.mean)
        datasets.close()
        assert not (cache_dir / "train").exists()
    for mode in ("memory", "disk"):
        for got, want in zip(batches[mode], batches["none"]):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_auto_cache_goes_to_disk_above_the_memory_limit(tmp_path):
    root = photo_folder(tmp_path / "photos")
    c = config(root, image_size=16, cache_memory_mb=1)
    assert data.load(c, data.describe(c), batch_size=4).info["cache"] == "memory"
    big = config(root, image_size=512, cache_memory_mb=1)
    datasets = data.load(big, data.describe(big), batch_size=4)
    assert datasets.info["cache"] == "disk" and os.path.isdir(datasets.scratch)
    datasets.close()
    assert not os.path.exists(datasets.scratch)


# ------------------------------------------------------- static eval shape ----

@pytest.mark.parametrize("head", ["conv", "mlp_sr", "linear", "vgg"])
def test_resize_crop_eval_batches_have_a_static_shape_for_every_head(tmp_path, head):
    root = photo_folder(tmp_path / "photos")
    recipe = recipe_from_dict({
        "name": "t", "data": {"source": "image_folder", "data_dir": str(root),
                              "image_size": 16, "augment": "imagenet"},
        "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "maxpool"}]},
        "aux": {"head": head, "k": 2, "width": 4}})
    spec = data.describe(recipe.data)
    datasets = data.load(recipe.data, spec, batch_size=4)
    assert tuple(datasets.eval.element_spec[0].shape) == (None, 16, 16, 3)
    spec = datasets.spec
    net = from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean, spec.std)
    logits = tf.function(lambda x: net.deployed_model()(x, training=False))
    for images, _ in datasets.eval:
        assert tuple(logits(images).shape) == (images.shape[0], 2)


# ------------------------------------------------------------------- CLI ----

def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kgreedy.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


TINY = ["--set", "train.epochs_per_stage=1", "--set", "train.steps_per_epoch=2",
        "--set", "train.batch_size=4", "--set", "data.image_size=16",
        "--set", "data.channels=3", "--set", "data.source=image_folder"]


@pytest.mark.slow
def test_cli_trains_a_train_test_folder_with_bad_files_and_reports_them(tmp_path):
    root = photo_folder(tmp_path / "photos")
    os.rename(root / "val", root / "test")
    write_bad_files(root / "train" / "cat")
    result = run_cli(os.path.join(ROOT, "recipes", "quickstart.json"), "--output",
                     str(tmp_path / "run"), "--set", f"data.data_dir={root}", *TINY,
                     "--set", "data.augment=imagenet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "from test/" in result.stdout
    assert "read 8 train images" in result.stdout  # the first pass reports itself
    assert "3 train file(s) cannot be decoded" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["skipped_files"] == 3
    assert summary["data"]["eval_from"] == "test/"
    assert not (tmp_path / "run" / "cache").exists()


@pytest.mark.slow
def test_cli_trains_bare_class_folders_and_refuses_bad_files_in_error_mode(tmp_path):
    root = photo_folder(tmp_path / "photos")
    for c in ("cat", "dog"):
        os.rename(root / "train" / c, root / c)
    for split in ("train", "val"):
        os.system(f"rm -r '{root / split}'")
    result = run_cli(os.path.join(ROOT, "recipes", "quickstart.json"), "--output",
                     str(tmp_path / "run"), "--set", f"data.data_dir={root}", *TINY,
                     "--set", "data.eval_fraction=0.25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["eval_from"].startswith("25% of the class folders")

    write_bad_files(root / "dog")
    bad = run_cli(os.path.join(ROOT, "recipes", "quickstart.json"), "--output",
                  str(tmp_path / "bad"), "--set", f"data.data_dir={root}", *TINY,
                  "--set", "data.bad_files=error", "--set", "data.cache=disk",
                  cwd=tmp_path)
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("kgreedy:")]
    assert len(lines) == 1 and "cannot decode" in lines[0] and "dog" in lines[0], bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()

"""The frozen-prefix feature cache: exact features, same training, cleaned up."""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy import data
from kgreedy.base.errors import RecipeError
from kgreedy.base.progress import Progress
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.training.cache import FeatureCache, prefix_flops, use_cache
from kgreedy.training.actions import Action
from kgreedy.training.run import fit_recipe
from kgreedy.training.rundir import RunDir


def recipe(cache="auto", augment="none", **train):
    return recipe_from_dict({
        "name": "cache",
        "seed": 2,
        "data": {"augment": augment},
        "model": {"blocks": [{"width": 8}, {"width": 16, "downsample": "psi"},
                             {"width": 16, "downsample": "avgpool"}]},
        "aux": {"k": 2, "width": 8},
        "train": {"epochs_per_stage": 2, "batch_size": 32, "steps_per_epoch": 5,
                  "steps_per_execution": 2, "cache_features": cache, **train},
        "export": {"enabled": False},
    })


def load(r):
    return data.load(r.data, data.describe(r.data), batch_size=r.train.batch_size, seed=r.seed)


@pytest.mark.parametrize("memory_mb", [1024, 0], ids=["memory", "disk"])
def test_cached_features_give_the_same_logits(tmp_path, memory_mb):
    r = recipe()
    datasets = load(r)
    spec = datasets.spec
    net = from_recipe(r, spec.image_shape, spec.num_classes, spec.mean, spec.std)
    cache = FeatureCache(net, 3, datasets, str(tmp_path / "cache"), memory_mb=memory_mb)
    assert cache.in_memory == bool(memory_mb)
    cache.build()
    assert os.path.isdir(tmp_path / "cache") != cache.in_memory
    images, labels = next(iter(datasets.train_source.batch(100)))
    features, cached_labels = next(iter(cache.train_source.batch(100)))
    np.testing.assert_array_equal(cached_labels.numpy(), labels.numpy())  # same order
    direct = net.stage_logits(net.features(images, 2), 3, training=False)
    cached = net.stage_logits(features, 3, training=False)
    np.testing.assert_allclose(cached.numpy(), direct.numpy(), rtol=1e-5, atol=1e-5)
    assert sum(1 for _ in cache.eval_source) == spec.num_eval
    cache.remove()
    assert not (tmp_path / "cache").exists()


class Weights(Action):
    def __init__(self):
        self.values = {}
        self.loops = {}

    def on_stage_end(self, trainer, stage, loop):
        self.loops[stage] = loop.cached_features
        self.values = {w.path: np.array(w.numpy())
                       for layer in trainer.net.modules + trainer.net.heads
                       for w in layer.weights}


def train(r, run_dir):
    keras.utils.set_random_seed(r.seed)
    os.makedirs(run_dir)
    weights = Weights()
    stream = io.StringIO()
    _, summary = fit_recipe(r, load(r), RunDir(run_dir), tf.distribute.get_strategy(),
                            progress=Progress(stream, live=False), actions=[weights])
    return weights, summary, stream.getvalue()


@pytest.mark.slow
def test_training_on_cached_features_matches_training_through_the_prefix(tmp_path):
    on, summary_on, out = train(recipe("on", cache_memory_mb=0), tmp_path / "on")
    off, summary_off, _ = train(recipe("off"), tmp_path / "off")
    assert on.loops == {1: False, 2: True, 3: True}
    assert off.loops == {1: False, 2: False, 3: False}
    assert "stage 3: caching the output of modules 1..2" in out
    for path, value in off.values.items():
        np.testing.assert_allclose(on.values[path], value, rtol=1e-4, atol=1e-4, err_msg=path)
    assert summary_on["final"]["val_accuracy"] == pytest.approx(
        summary_off["final"]["val_accuracy"], abs=0.01)
    assert not (tmp_path / "on" / "cache" / "stage3").exists()  # removed after the stage


def test_a_cache_whose_build_fails_is_removed(tmp_path, monkeypatch):
    """The cache action (`FeatureCaching.stage_source`) removes what a failed build
    wrote: here the train split's features are on disk when the eval split fails."""
    cache_split = FeatureCache._cache

    def failing(self, source, prefix, split):
        if split == "eval":
            assert os.listdir(self.directory) == ["train"]  # written, on disk
            raise RuntimeError("eval split failed")
        return cache_split(self, source, prefix, split)

    monkeypatch.setattr(FeatureCache, "_cache", failing)
    with pytest.raises(RuntimeError, match="eval split failed"):
        train(recipe("on", cache_memory_mb=0), tmp_path / "run")
    assert not (tmp_path / "run" / "cache" / "stage2").exists()


def test_when_the_cache_is_used():
    datasets = load(recipe())
    spec = datasets.spec
    net = from_recipe(recipe(), spec.image_shape, spec.num_classes, spec.mean, spec.std)
    # auto: stage 3's prefix (two convs, the second after psi) costs 153 FLOPs per
    # cached byte, worth caching; stage 2's (one 1->8 conv at 8x8) costs 4.5,
    # cheaper to recompute than to read back.
    assert prefix_flops(net, 3) / (4 * 4 * 4 * 16) == pytest.approx(153.0)
    assert use_cache(recipe().train, datasets, 3, num_workers=1, net=net)
    assert not use_cache(recipe().train, datasets, 2, num_workers=1, net=net)
    assert use_cache(recipe("on").train, datasets, 2, num_workers=1, net=net)
    assert not use_cache(recipe().train, datasets, 1, num_workers=1, net=net)  # nothing frozen
    assert not use_cache(recipe().train, datasets, 3, num_workers=2, net=net)
    assert not use_cache(recipe("off").train, datasets, 3, num_workers=1, net=net)
    augmented = recipe(augment="cifar")
    assert not use_cache(augmented.train, load(augmented), 3, num_workers=1, net=net)
    with pytest.raises(RecipeError, match=r"train.cache_features: 'on' needs data.augment "
                                          r"'none'.*received 'on'"):
        recipe("on", augment="cifar")
    # 'on' with several workers: each would cache only its own shard.
    with pytest.raises(RecipeError, match=r"^train.cache_features: 'on' needs a single "
                                          r"worker, and this run has 2"):
        use_cache(recipe("on").train, datasets, 2, num_workers=2, net=net)

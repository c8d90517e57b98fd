"""The frozen-prefix feature cache (`train.cache_features`).

During stage j, modules 1..j-1 are frozen and run in inference mode, so when the
stage's inputs are deterministic (no augmentation) their output is the same every
epoch. `FeatureCache` runs them once over the train and eval examples and stage j
trains on the result: each step then costs only module j and its head.
`FeatureCaching` is the run's action that decides per stage (`use_cache`), builds
the cache before the stage's loop is made and removes it when the stage ends.
"""

import contextlib
import os
import shutil
import time

import numpy as np
import tensorflow as tf

from kgreedy.base.errors import RecipeError
from kgreedy.data.stores import Examples, HasSplits, PackedStore
from kgreedy.training.actions import Action


# Prefix FLOPs per cached byte above which the cache pays for itself: the frozen
# modules' forward pass it saves must cost more than reading the features back
# (and, on disk, writing them once). tools/cache_cost.py on the quiet 2-core CPU of
# docs/BENCHMARKS.md: forward convs at 16-250 GFLOP/s, features read back at 2.3 GB/s
# from memory and 1.2 GB/s from disk, so break-even near 110 and 200; disk is set
# higher for the one-off write and the disk space.
MIN_FLOPS_PER_BYTE = {"memory": 100, "disk": 300}


def prefix_flops(net, stage):
    """Multiply-adds x 2 of the convs and dense layers of modules 1..stage-1, per
    example."""
    return sum(module_flops(module, shape)
               for module, shape in zip(net.modules[:stage - 1], net.stage_shapes))


def module_flops(module, output_shape):
    """Multiply-adds x 2 per example of a module's kernels: each kernel's size times
    the positions of its output map (a `ConvBlock`'s is the module's output; a
    layer of a split model has the output its model gave it)."""
    conv = getattr(module, "conv", None)
    if conv is not None and not hasattr(module, "layers"):
        return 2 * output_shape[0] * output_shape[1] * int(np.prod(conv.kernel.shape))
    total = 0
    for layer in getattr(module, "layers", ()):
        if getattr(layer, "layers", None):
            total += module_flops(layer, output_shape)
            continue
        kernel = getattr(layer, "kernel", None)
        nodes = getattr(layer, "_inbound_nodes", None)
        if kernel is None or not nodes:
            continue
        positions = int(np.prod([d or 1 for d in nodes[0].output_tensors[0].shape[1:-1]]))
        total += 2 * positions * int(np.prod(kernel.shape))
    return total


def check_cache_workers(train, num_workers):
    """Refuses `train.cache_features` 'on' with several workers: each worker would
    cache only its own shard, which the data order does not allow for.

    Raises:
        RecipeError: 'on' with more than one worker.
    """
    if train.cache_features == "on" and num_workers != 1:
        raise RecipeError("train.cache_features", f"'on' needs a single worker, and this "
                          f"run has {num_workers}; use 'auto' (off with several "
                          "workers) or 'off'", "on")


def use_cache(train, datasets, stage, num_workers, net):
    """Whether stage `stage` trains on cached features (`train.cache_features`).

    `auto` caches when there is a prefix to skip, the inputs are not augmented, the
    objective does not rebuild the input image (cached features do not hold it), the
    run is greedy and has one worker (see `check_cache_workers`), and the prefix's
    FLOPs per cached byte reach `MIN_FLOPS_PER_BYTE` (a cheap prefix with a large
    output, such as one conv at full resolution, is faster to recompute than to
    read back). `on` has been validated against the recipe already.

    Raises:
        RecipeError: 'on' with more than one worker.
    """
    check_cache_workers(train, num_workers)
    mode = train.cache_features
    if mode == "off" or stage < 2 or train.mode != "greedy":
        return False
    if mode == "on":
        return True
    if datasets.augmented or num_workers != 1 or net.objective.needs_images:
        return False
    in_memory = feature_bytes(net, stage, datasets) <= train.cache_memory_mb * 2 ** 20
    per_byte = prefix_flops(net, stage) / (4 * np.prod(net.stage_shapes[stage - 2]))
    return per_byte >= MIN_FLOPS_PER_BYTE["memory" if in_memory else "disk"]


def feature_bytes(net, stage, datasets):
    """Bytes of the output of modules 1..stage-1 for every train and eval example."""
    examples = (datasets.spec.num_train or 0) + (datasets.spec.num_eval or 0)
    return int(np.prod(net.stage_shapes[stage - 2])) * 4 * examples


class FeatureCache(HasSplits):
    """Output of modules 1..stage-1 for every train and eval example, computed once.

    Examples keep the order of `datasets.train_source`/`eval_source`, so the seeded
    per-epoch order (and a mid-epoch resume) is the same with or without the cache:
    for indexed splits (digits, image folders) the features are `stores.Examples`
    with the same indices, for streams (TFDS) a stream in the same order. Features
    stay in memory up to `memory_mb`, else they go to `directory` (removed by
    `remove`).

    Args:
        net: the `GreedyNet`.
        stage: the stage about to train (modules 1..stage-1 are cached).
        datasets: the run's `Datasets`.
        directory: where features that do not fit in memory go.
        memory_mb: the in-memory limit in MiB.
        batch_size: examples per forward pass while caching.
    """

    def __init__(self, net, stage, datasets, directory, memory_mb=1024, batch_size=256):
        self.net = net
        self.stage = stage
        self.datasets = datasets
        self.directory = directory
        self.memory_mb = memory_mb
        self.batch_size = batch_size
        self.bytes = feature_bytes(net, stage, datasets)
        self.in_memory = self.bytes <= memory_mb * 2 ** 20
        self.train_split = None  # `stores.Examples`, or a stream for TFDS
        self.eval_split = None
        self.seconds = None

    def describe(self):
        where = "in memory" if self.in_memory else f"on disk in {self.directory}"
        return (f"caching the output of modules 1..{self.stage - 1} "
                f"({self.bytes / 2 ** 30:.2f} GiB, {where})")

    def build(self):
        """Runs the frozen modules over every example; returns self."""
        start = time.perf_counter()
        prefix = tf.function(
            lambda images: self.net.features(images, self.stage - 1, training=False),
            reduce_retracing=True)
        self.train_split = self._cache(self.datasets.train_split, prefix, "train")
        self.eval_split = self._cache(self.datasets.eval_split, prefix, "eval")
        self.seconds = time.perf_counter() - start
        return self

    def _batches(self, source, prefix):
        ds = self.datasets.eval_view(source).batch(self.batch_size).prefetch(tf.data.AUTOTUNE)
        for images, labels in ds:
            yield prefix(images), labels

    def _cache(self, source, prefix, split):
        if isinstance(source, Examples):
            store = PackedStore(np.float32, self.net.stage_shapes[self.stage - 2][-1],
                                None if self.in_memory else os.path.join(self.directory,
                                                                         split))
            for features, _ in self._batches(source, prefix):
                store.extend(features.numpy())
            return Examples.from_store(store.finish(), source.labels)
        if self.in_memory:
            features, labels = zip(*((f.numpy(), y.numpy())
                                     for f, y in self._batches(source, prefix)))
            return tf.data.Dataset.from_tensor_slices((np.concatenate(features),
                                                       np.concatenate(labels)))
        shape = self.net.stage_shapes[self.stage - 2]
        signature = (tf.TensorSpec((None, *shape), tf.float32),
                     tf.TensorSpec((None,), tf.int32))
        computed = tf.data.Dataset.from_generator(
            lambda: self._batches(source, prefix), output_signature=signature).unbatch()
        path = os.path.join(self.directory, split)
        # One shard: loading then returns the examples in the order they were saved.
        computed.save(path, shard_func=lambda features, label: tf.constant(0, tf.int64))
        return tf.data.Dataset.load(path)

    def remove(self):
        """Frees the features (and deletes the on-disk copy)."""
        for split in (self.train_split, self.eval_split):
            if isinstance(split, Examples):
                split.remove()
        self.train_split = self.eval_split = None
        if not self.in_memory:
            shutil.rmtree(self.directory, ignore_errors=True)


class FeatureCaching(Action):
    """The feature cache as a run's action (`kgreedy.training.actions`): each stage
    that `use_cache` picks reads a `FeatureCache` built before its loop is made, in
    RUN_DIR/cache/stage{j} where it spills to disk, and removed when the stage ends.

    Args:
        train: the run's `TrainConfig` (`cache_features`, `cache_memory_mb`).
    """

    def __init__(self, train):
        self.train = train

    @contextlib.contextmanager
    def stage_source(self, trainer, stage):
        if not use_cache(self.train, trainer.datasets, stage, trainer.worker.num_workers,
                         trainer.net):
            yield None
            return
        directory = None if trainer.run is None else trainer.run.path("cache",
                                                                      f"stage{stage}")
        cache = FeatureCache(trainer.net, stage, trainer.datasets, directory,
                             self.train.cache_memory_mb)
        try:
            trainer.progress.message(f"stage {stage}: {cache.describe()}")
            cache.build()
            trainer.progress.message(f"stage {stage}: cached in {cache.seconds:.1f}s")
            yield cache
        finally:
            cache.remove()

"""Input pipelines (tf.data) for the sources `digits`, `tfds` and `image_folder`.

Pipelines yield raw pixel values on the dataset's own scale (0..16 for digits,
0..255 for photos) as float32; normalisation lives in the model (`Standardize`),
so the exported SavedModel takes the same raw values. `eval_transform` is the one
definition of the eval-time resize/crop, shared by the eval pipeline and export.
"""

import dataclasses
import shutil
import warnings

import numpy as np
import tensorflow as tf

from kgreedy.base.errors import DataError
from kgreedy.data import image_cache
from kgreedy.data import tfds as tfds_prepare
from kgreedy.data.spec import (DIGITS_COUNT, describe_tfds, folder_layout, tfds_builder,
                               tfds_split_names, with_stats)
from kgreedy.data.stores import Examples, HasSplits, ordered
from kgreedy.data.transforms import eval_transform, match_channels, train_transform

# tf.distribute reads dataset options while tracing the input function and warns
# that graph-mode options may be stale; ours are set in that same function.
warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options",
                        category=UserWarning)
_STATS_SAMPLE = 2048  # images read to measure mean/std when the recipe gives none


class Datasets(HasSplits):
    """Train and eval pipelines of (images float32 [B,H,W,C], labels int32 [B]).

    The train order and augmentation are pure functions of (seed, epoch, position):
    every epoch has its own shuffle seed and every example its own stateless
    augmentation seed. So an epoch can be rebuilt and entered at any step (resume),
    and one global batch holds the same examples whatever the replica count.

    A split is either indexed (`stores.Examples`: digits, image folders, the feature
    cache of either), whose whole list of example indices is shuffled each epoch
    before anything is loaded, so every batch is a uniform draw; or a stream
    (`tf.data.Dataset`: TFDS), shuffled through `data.shuffle_buffer`.

    Args:
        train: the train split (`Examples`, or decoded examples in a fixed order).
        evals: the eval split, likewise.
        spec: the `DatasetSpec`, normalisation statistics included.
        config: the recipe's `DataConfig`.
        batch_size: global train batch.
        eval_batch_size: global eval batch.
        seed: the recipe seed.
        info: what a run reports of its data in summary.json (files left out, ...).
        scratch: a folder `close` removes (a disk cache made without a run directory).
    """

    def __init__(self, train, evals, spec, config, batch_size, eval_batch_size, seed,
                 info=None, scratch=None):
        self.train_split = train
        self.eval_split = evals
        self.spec = spec
        self.config = config
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.info = info or {}
        self.scratch = scratch
        self._augment = train_transform(config, spec)

    def stage_steps(self, train, num_workers=1):
        """Train steps per epoch of a stage: one pass, capped by
        `train.steps_per_epoch`. Each worker reads its own shard, so an epoch is as
        long as the smallest shard allows."""
        steps = (self.spec.num_train // num_workers) // (train.batch_size // num_workers)
        return min(steps, train.steps_per_epoch or steps)

    def distributed_train(self, strategy, stage, epoch, train, skip_steps=0, source=None):
        """`train_for` of stage `stage`'s epoch `epoch` (1-based), distributed.

        Every (stage, epoch) gets its own shuffle order and augmentation draws.
        """
        data_epoch = (stage - 1) * train.epochs_per_stage + epoch - 1
        return strategy.distribute_datasets_from_function(
            lambda context: self.train_for(data_epoch, skip_steps, context, source))

    def distributed_eval(self, strategy, source=None):
        """`eval_for`, distributed."""
        return strategy.distribute_datasets_from_function(
            lambda context: self.eval_for(context, source))

    def eval_view(self, source):
        """`source` examples through the eval-time resize/crop, in order, unbatched."""
        spec = self.spec
        return ordered(source).map(lambda x, y: (eval_transform(x, spec), y),
                                    num_parallel_calls=tf.data.AUTOTUNE)

    @property
    def augmented(self):
        """Whether training inputs are random (then features cannot be cached)."""
        return self.config.augment != "none"

    @property
    def indexed(self):
        """Whether the splits are `Examples` (loaded by index) rather than streams."""
        return isinstance(self.train_split, Examples)

    def train_for(self, epoch=0, skip_steps=0, input_context=None, source=None):
        """The train pipeline of one epoch (0-based), full batches only.

        Args:
            epoch: selects the shuffle order and augmentation draws.
            skip_steps: global steps of this epoch already trained (resume).
            input_context: a `tf.distribute.InputContext`: the pipeline then yields
                per-replica batches of this worker's shard of the examples.
            source: examples to use instead of the train split, in the same order
                and already transformed (the frozen-prefix feature cache).
        """
        batch, pipelines, pipeline_id = self.batch_size, 1, 0
        split = self.train_split if source is None else source
        if input_context is not None:
            batch = input_context.get_per_replica_batch_size(self.batch_size)
            pipelines, pipeline_id = (input_context.num_input_pipelines,
                                      input_context.input_pipeline_id)
        epoch_seed = self.seed * 1_000_003 + epoch
        skip = skip_steps * (self.batch_size // pipelines)
        if isinstance(split, Examples):
            # Indices are shuffled and skipped before any example is loaded.
            order = tf.data.Dataset.range(split.count).shard(pipelines, pipeline_id)
            order = (order.shuffle(max(split.count, 1), seed=epoch_seed,
                                   reshuffle_each_iteration=False)
                     .enumerate().skip(skip))
            ds = order.map(lambda position, index: (position, split.example(index)),
                           num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = (split.shard(pipelines, pipeline_id)
                  .shuffle(self.config.shuffle_buffer, seed=epoch_seed,
                           reshuffle_each_iteration=False)
                  .enumerate().skip(skip))
        augment, base = self._augment, pipeline_id * 2 ** 32
        if source is not None:
            augment = _as_is

        def transform(index, example):
            image, label = example
            return augment(image, tf.stack([tf.constant(epoch_seed, tf.int64),
                                            index + base])), label

        ds = (ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
              .batch(batch, drop_remainder=True))
        return _with_options(ds).prefetch(tf.data.AUTOTUNE)

    def eval_for(self, input_context=None, source=None):
        """The eval pipeline, in order; the last batch may be partial.

        `source`: already transformed examples to use instead of the eval split.
        """
        batch = self.eval_batch_size
        split = self.eval_split if source is None else source
        pipelines, pipeline_id = 1, 0
        if input_context is not None:
            batch = input_context.get_per_replica_batch_size(self.eval_batch_size)
            pipelines, pipeline_id = (input_context.num_input_pipelines,
                                      input_context.input_pipeline_id)
        if isinstance(split, Examples):
            ds = split.take(tf.data.Dataset.range(split.count).shard(pipelines, pipeline_id))
        else:
            ds = split.shard(pipelines, pipeline_id)
        if source is None:
            ds = self.eval_view(ds)
        ds = ds.batch(batch)
        return _with_options(ds).prefetch(tf.data.AUTOTUNE)

    def sample(self, split, count, seed):
        """Up to `count` examples of `split` (`train_split` or `eval_split`) through
        the eval-time view, in batches: a uniform draw for an indexed split; for a
        stream, its first examples shuffled through `data.shuffle_buffer` (TFDS
        shuffles its records when it prepares a dataset)."""
        if isinstance(split, Examples):
            indices = tf.data.Dataset.from_tensor_slices(split.sample_indices(count, seed))
            ds = self.eval_view(split.take(indices))
        else:
            ds = (self.eval_view(split)
                  .shuffle(max(count, self.config.shuffle_buffer), seed=seed,
                           reshuffle_each_iteration=False).take(count))
        return ds.batch(self.eval_batch_size)

    def close(self):
        """Frees cached images and removes a scratch folder; safe to call twice."""
        for split in (self.train_split, self.eval_split):
            if isinstance(split, Examples):
                split.remove()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    @property
    def train(self):
        """Epoch 0 in global batches (tools and tests; training uses `train_for`)."""
        return self.train_for(0)

    @property
    def eval(self):
        """The eval pipeline in global batches."""
        return self.eval_for()


def _as_is(features, seed):
    del seed  # cached features are not augmented
    return features


def _with_options(ds):
    options = tf.data.Options()
    # Sharding is done explicitly per input pipeline (one per worker); tf.distribute
    # must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return ds.with_options(options)


def _digits_arrays(config, seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None]
    if (config.channels or 1) == 3:  # grey to RGB, as the other sources do
        images = np.repeat(images, 3, axis=-1)
    return train_test_split(images, digits.target.astype(np.int32),
                            test_size=config.eval_fraction, stratify=digits.target,
                            random_state=seed)


def _tfds_sources(config, spec):
    import tensorflow_datasets as tfds

    builder = tfds_builder(config)
    if not builder.is_prepared():
        tfds_prepare.prepare(builder, config)
        spec = describe_tfds(config)

    def split(name):
        ds = builder.as_dataset(split=name, as_supervised=True,
                                read_config=tfds.ReadConfig(try_autocache=False))
        return ds.map(lambda image, label: (match_channels(tf.cast(image, tf.float32),
                                                            spec.image_shape[2]),
                                            tf.cast(label, tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)

    train_name, eval_name = tfds_split_names(config)
    return split(train_name), split(eval_name), spec


def tfds_in_memory(spec):
    """Whether a TFDS dataset's decoded images stay in memory (float32, filled during
    the first pass): when they are few and small (CIFAR), since decoding dominates
    otherwise. Large sets stream from disk every epoch."""
    return ((spec.num_train or 0) * np.prod(spec.image_shape) * 4 < 2 ** 30
            and spec.eval_resize == "none")


def counted(config, spec):
    """`spec` with the digits' example count where `describe` left it unknown (the
    split is made at load: all 1,797 are counted as train): for sizing."""
    if config.source == "digits" and spec.num_train is None:
        return dataclasses.replace(spec, num_train=DIGITS_COUNT, num_eval=0)
    return spec


def memory_bytes(config, spec):
    """Bytes the loaded data keeps in memory for the whole run (`kgreedy.training.
    memory` counts them): the digits' float32 arrays, a TFDS set's float32 cache
    (`tfds_in_memory`), an image folder's decoded uint8 images when `data.cache`
    keeps them in memory (at the model's size: an upper bound of `data.cache_memory_mb`
    under `auto`); 0 where the images stream from disk."""
    spec = counted(config, spec)
    count = (spec.num_train or 0) + (spec.num_eval or 0)
    pixels = int(np.prod(spec.image_shape))
    if config.source == "digits":
        return count * pixels * 4
    if config.source == "image_folder":
        kept = count * pixels  # uint8, about the model's size (a shorter side kept)
        if config.cache == "memory":
            return kept
        return kept if config.cache == "auto" and kept <= config.cache_memory_mb * 2 ** 20 \
            else 0
    return count * pixels * 4 if tfds_in_memory(spec) else 0


def load(config, spec, *, batch_size, eval_batch_size=None, seed=0, cache_dir=None,
         progress=None):
    """Builds the train and eval pipelines and measures normalisation statistics.

    Args:
        config: a `DataConfig`.
        spec: `describe(config)`.
        batch_size: global train batch; partial batches are dropped.
        eval_batch_size: global eval batch (default: batch_size).
        seed: seeds the digits split, the folder hold-out, the shuffle order and the
            augmentation.
        cache_dir: where an image folder's decoded images go with `data.cache` disk
            (default: a temporary folder that `Datasets.close` removes).
        progress: a `Progress` for the image-folder pass, or None for silence.

    Returns:
        `Datasets`, with `spec.mean`/`spec.std` filled in. Call `close()` when done
        with it, to free the images it keeps.

    Raises:
        DataError: the data cannot be read.
    """
    eval_batch_size = eval_batch_size or batch_size
    info, scratch = {}, None
    if config.source == "digits":
        x_train, x_eval, y_train, y_eval = _digits_arrays(config, seed)
        spec = dataclasses.replace(spec, num_train=len(x_train), num_eval=len(x_eval))
        spec = with_stats(config, spec, lambda: x_train)
        train = Examples.from_arrays(x_train, y_train)
        evals = Examples.from_arrays(x_eval, y_eval)
    elif config.source == "image_folder":
        train, evals, spec, info, scratch = image_cache.load_folder(
            config, spec, folder_layout(config, seed), cache_dir, progress)
        sampler = Datasets(train, evals, spec, config, batch_size, eval_batch_size, seed)
        spec = with_stats(config, spec,
                           lambda: sampler.sample(train, _STATS_SAMPLE, seed).map(
                               lambda images, labels: images))
    else:
        train, evals, spec = _tfds_sources(config, spec)
        sample = lambda: train.take(_STATS_SAMPLE).map(  # noqa: E731
            lambda x, y: eval_transform(x, spec)).batch(256)
        spec = with_stats(config, spec, sample)
        if tfds_in_memory(spec):
            train, evals = train.cache(), evals.cache()
    datasets = Datasets(train, evals, spec, config, batch_size, eval_batch_size, seed,
                        info, scratch)
    if spec.num_train is not None and spec.num_train < batch_size:
        datasets.close()
        raise DataError("train.batch_size", f"larger than the {spec.num_train} training "
                        "examples", batch_size)
    return datasets



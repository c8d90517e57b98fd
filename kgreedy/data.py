"""Input pipelines (tf.data) for the sources `digits`, `tfds` and `image_folder`.

Pipelines yield raw pixel values on the dataset's own scale (0..16 for digits,
0..255 for photos) as float32; normalisation lives in the model (`Standardize`),
so the exported SavedModel takes the same raw values. `eval_transform` is the one
definition of the eval-time resize/crop, shared by the eval pipeline and export.
"""

import dataclasses
import json
import os
import shutil
import warnings

import numpy as np
import tensorflow as tf

from kgreedy import folders, image_cache, tfds_prepare
from kgreedy.errors import DataError
from kgreedy.files import write_json
from kgreedy.stores import Examples, HasSplits, ordered
# decode_image and eval_transform are part of this module's interface (the export
# and tools use them from here).
from kgreedy.transforms import (decode_image, eval_transform,  # noqa: F401
                                match_channels, train_transform)

# tf.distribute reads dataset options while tracing the input function and warns
# that graph-mode options may be stale; ours are set in that same function.
warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options",
                        category=UserWarning)
_STATS_SAMPLE = 2048  # images read to measure mean/std when the recipe gives none


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the model and export need to know of a dataset; saved as dataset.json.

    Attributes:
        image_shape: (size, size, channels) of the model input.
        num_classes: number of classes.
        class_names: one name per class id.
        eval_resize: `none` (inputs already have image_shape), `resize` (to
            image_shape) or `resize_crop` (shorter side to size / crop_fraction,
            then a centre crop).
        crop_fraction: see eval_resize.
        num_train: training examples, when known.
        num_eval: evaluation examples, when known.
        mean: per-channel mean of raw train pixels (None until measured).
        std: per-channel std of raw train pixels (None until measured).
    """

    image_shape: tuple
    num_classes: int
    class_names: tuple
    eval_resize: str = "none"
    crop_fraction: float = 0.875
    num_train: int = None
    num_eval: int = None
    mean: tuple = None
    std: tuple = None

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
        self.steps_per_epoch = spec.num_train // batch_size if spec.num_train else None
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


def _eval_resize_kind(config, native_size):
    if config.augment == "imagenet":
        return "resize_crop"
    if native_size is not None and native_size == (config.image_size or native_size):
        return "none"
    return "resize"


# ---------------------------------------------------------------- describe ----

def describe(config):
    """The dataset's shape, classes and eval resizing, without reading pixels.

    Args:
        config: a `DataConfig`.

    Returns:
        A `DatasetSpec` whose mean/std are None.

    Raises:
        DataError: the data cannot be found or used, in seconds.
    """
    if config.source == "digits":
        size = config.image_size or 8
        return DatasetSpec((size, size, config.channels or 1), 10,
                           tuple(str(i) for i in range(10)),
                           _eval_resize_kind(config, 8), config.eval_crop_fraction)
    if config.source == "tfds":
        return _describe_tfds(config)
    return _describe_folder(config)


def tfds_split_names(config):
    """The TFDS splits to train and evaluate on (default `train` and `test`)."""
    return config.train_split or "train", config.eval_split or "test"


def _tfds_builder(config):
    import tensorflow_datasets as tfds  # slow import: only when used

    data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
    try:
        return tfds.builder(config.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError("data.name", "not a TFDS dataset known to this tensorflow-datasets",
                        config.name) from None


def _describe_tfds(config):
    builder = _tfds_builder(config)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError("data.name", "is not an image classification dataset with "
                        "'image' and 'label' features", config.name)
    h, w, c = features["image"].shape
    native = h if (h is not None and h == w) else None
    size = config.image_size or native
    if size is None:
        raise DataError("data.image_size", f"{config.name} images have no fixed square "
                        "size; set data.image_size", None)
    splits = builder.info.splits
    counts = {}
    for key, split in zip(("train_split", "eval_split"), tfds_split_names(config)):
        if builder.is_prepared():
            try:
                counts[key] = splits[split].num_examples
            except (KeyError, ValueError):
                raise DataError(f"data.{key}", f"no such split in {config.name}; "
                                f"available: {', '.join(splits.keys())}", split) from None
    label = features["label"]
    return DatasetSpec((size, size, config.channels or c or 3), label.num_classes,
                       tuple(label.names), _eval_resize_kind(config, native),
                       config.eval_crop_fraction, counts.get("train_split"),
                       counts.get("eval_split"))


def _describe_folder(config):
    layout = _folder_layout(config)
    size = config.image_size
    return DatasetSpec((size, size, config.channels or 3), len(layout.classes),
                       layout.classes, _eval_resize_kind(config, None),
                       config.eval_crop_fraction, len(layout.train), len(layout.eval))


def _folder_layout(config, seed=0):
    return folders.find_layout(config.data_dir, config.train_split, config.eval_split,
                               config.eval_fraction, seed)


# ------------------------------------------------------------------- load ----

def _measure_stats(images):
    """Per-channel mean/std of raw pixels over a sample (an array or a dataset)."""
    if isinstance(images, np.ndarray):
        x = images.reshape(-1, images.shape[-1]).astype(np.float64)
        return tuple(x.mean(0).tolist()), tuple(np.maximum(x.std(0), 1e-6).tolist())
    count, total, total_sq = 0, 0.0, 0.0
    for batch in images:
        x = batch.numpy().reshape(-1, batch.shape[-1]).astype(np.float64)
        count += len(x)
        total = total + x.sum(0)
        total_sq = total_sq + (x * x).sum(0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    return tuple(mean.tolist()), tuple(np.maximum(std, 1e-6).tolist())


def _with_stats(config, spec, sample):
    # The recipe's values, else those a run saved in its spec (probes and tools that
    # reload a run need not read the data again), else measured now.
    mean = config.mean if config.mean is not None else spec.mean
    std = config.std if config.std is not None else spec.std
    if mean is None or std is None:
        measured_mean, measured_std = _measure_stats(sample())
        mean = mean if mean is not None else measured_mean
        std = std if std is not None else measured_std
    channels = spec.image_shape[2]
    for key, stats in (("mean", mean), ("std", std)):
        if len(stats) not in (1, channels):
            raise DataError(f"data.{key}", f"needs one value, or one per channel of the "
                            f"model input ({channels})", list(stats))
    mean = tuple(mean) * (channels if len(mean) == 1 else 1)
    std = tuple(std) * (channels if len(std) == 1 else 1)
    return dataclasses.replace(spec, mean=mean, std=std)


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

    builder = _tfds_builder(config)
    if not builder.is_prepared():
        tfds_prepare.prepare(builder, config)
        spec = _describe_tfds(config)

    def split(name):
        ds = builder.as_dataset(split=name, as_supervised=True,
                                read_config=tfds.ReadConfig(try_autocache=False))
        return ds.map(lambda image, label: (match_channels(tf.cast(image, tf.float32),
                                                            spec.image_shape[2]),
                                            tf.cast(label, tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)

    train_name, eval_name = tfds_split_names(config)
    return split(train_name), split(eval_name), spec


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
        spec = _with_stats(config, spec, lambda: x_train)
        train = Examples.from_arrays(x_train, y_train)
        evals = Examples.from_arrays(x_eval, y_eval)
    elif config.source == "image_folder":
        train, evals, spec, info, scratch = image_cache.load_folder(
            config, spec, _folder_layout(config, seed), cache_dir, progress)
        sampler = Datasets(train, evals, spec, config, batch_size, eval_batch_size, seed)
        spec = _with_stats(config, spec,
                           lambda: sampler.sample(train, _STATS_SAMPLE, seed).map(
                               lambda images, labels: images))
    else:
        train, evals, spec = _tfds_sources(config, spec)
        sample = lambda: train.take(_STATS_SAMPLE).map(  # noqa: E731
            lambda x, y: eval_transform(x, spec)).batch(256)
        spec = _with_stats(config, spec, sample)
        # Decoded images stay in memory when they are few and small (CIFAR):
        # decoding dominates otherwise. Large sets stream from disk every epoch.
        if (spec.num_train or 0) * np.prod(spec.image_shape) * 4 < 2 ** 30 \
                and spec.eval_resize == "none":
            train, evals = train.cache(), evals.cache()
    datasets = Datasets(train, evals, spec, config, batch_size, eval_batch_size, seed,
                        info, scratch)
    if spec.num_train is not None and spec.num_train < batch_size:
        datasets.close()
        raise DataError("train.batch_size", f"larger than the {spec.num_train} training "
                        "examples", batch_size)
    return datasets


def save_spec(spec, path):
    """Writes dataset.json atomically."""
    write_json(path, spec.to_dict())


def load_spec(path):
    with open(path, encoding="utf-8") as f:
        return DatasetSpec.from_dict(json.load(f))

"""What a dataset is, before any pixel is read: its `DatasetSpec` (shape, classes,
eval resizing, normalisation statistics), found by `describe` and kept in a run's
dataset.json."""

import dataclasses
import os

import numpy as np

from kgreedy.base.errors import DataError
from kgreedy.base.files import read_json, write_json
from kgreedy.data import folders


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


def _eval_resize_kind(config, native_size):
    if config.augment == "imagenet":
        return "resize_crop"
    if native_size is not None and native_size == (config.image_size or native_size):
        return "none"
    return "resize"


DIGITS_COUNT = 1797  # images in scikit-learn's digits (`load` splits them)

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
        return describe_tfds(config)
    return _describe_folder(config)


def tfds_split_names(config):
    """The TFDS splits to train and evaluate on (default `train` and `test`)."""
    return config.train_split or "train", config.eval_split or "test"


def tfds_builder(config):
    import tensorflow_datasets as tfds  # slow import: only when used

    data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
    try:
        return tfds.builder(config.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError("data.name", "not a TFDS dataset known to this tensorflow-datasets",
                        config.name) from None


def describe_tfds(config):
    builder = tfds_builder(config)
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
    layout = folder_layout(config)
    size = config.image_size
    return DatasetSpec((size, size, config.channels or 3), len(layout.classes),
                       layout.classes, _eval_resize_kind(config, None),
                       config.eval_crop_fraction, len(layout.train), len(layout.eval))


def folder_layout(config, seed=0):
    return folders.find_layout(config.data_dir, config.train_split, config.eval_split,
                               config.eval_fraction, seed)


def measure_stats(images):
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


def with_stats(config, spec, sample):
    # The recipe's values, else those a run saved in its spec (probes and tools that
    # reload a run need not read the data again), else measured now.
    mean = config.mean if config.mean is not None else spec.mean
    std = config.std if config.std is not None else spec.std
    if mean is None or std is None:
        measured_mean, measured_std = measure_stats(sample())
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


def save_spec(spec, path):
    """Writes dataset.json atomically."""
    write_json(path, spec.to_dict())


def load_spec(path):
    """Reads dataset.json."""
    return DatasetSpec.from_dict(read_json(path, "dataset.json"))

"""A caller's own tf.data pipelines behind the `Datasets` interface (`kgreedy.fit`).

The engine (`kgreedy.training`) asks its data for an epoch's distributed train
pipeline positioned at a step, the distributed eval pipeline, the steps of an epoch
and the `DatasetSpec`. `ExternalDatasets` answers these from batched
`tf.data.Dataset`s of (images, labels), as Keras' `Model.fit` takes them: each epoch
iterates the train pipeline afresh from its start (its own shuffling applies) and
takes `steps_per_epoch` batches of it.

Checking the pipelines (`check_pipeline`) happens before any work, with errors in
Keras' style (`ValueError`, `Received: ...`).
"""

import tensorflow as tf

from kgreedy.base.errors import format_value
from kgreedy.data.spec import DatasetSpec


def check_pipeline(dataset, name, image_shape):
    """Refuses what the engine cannot train or evaluate on.

    Args:
        dataset: what the caller passed.
        name: the argument's name in errors (`train_ds`, `validation_data`).
        image_shape: (height, width, channels) the net takes.

    Returns:
        Its cardinality: the number of batches, or `tf.data.INFINITE_CARDINALITY`
        or `tf.data.UNKNOWN_CARDINALITY` (both negative).

    Raises:
        ValueError: not a `tf.data.Dataset` of (images, labels) batches of the net's
            image shape with integer class ids, or an empty one.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            f"`{name}` must be a tf.data.Dataset of (images, labels) batches, e.g. "
            "tf.data.Dataset.from_tensor_slices((x, y)).batch(64). "
            f"Received: {name}={format_value(dataset)}")
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2
            and all(isinstance(s, tf.TensorSpec) for s in spec)):
        raise ValueError(f"`{name}` must yield (images, labels) pairs of tensors. "
                         f"Received: {name} with element_spec={spec}")
    images, labels = spec
    if images.shape.rank != 4:
        hint = " (batch it: .batch(64))" if images.shape.rank == 3 else ""
        raise ValueError(f"`{name}` must yield batches of images of shape (batch, "
                         f"height, width, channels){hint}. Received: {name} with "
                         f"images of shape {images.shape}")
    wanted = tf.TensorShape([None, *image_shape])
    if not images.shape.is_compatible_with(wanted):
        raise ValueError(f"`{name}` yields images of shape {images.shape}; the net "
                         f"takes {tuple(image_shape)}. Received: {name} with "
                         f"element_spec={spec}")
    if not (images.dtype.is_floating or images.dtype.is_integer):
        raise ValueError(f"`{name}` must yield numeric images. Received: images of "
                         f"dtype {images.dtype.name}")
    if not labels.dtype.is_integer or labels.shape.rank not in (1, 2) or (
            labels.shape.rank == 2 and labels.shape[1] not in (None, 1)):
        raise ValueError(f"`{name}` must yield integer class ids of shape (batch,), as "
                         "for sparse categorical cross-entropy (not one-hot rows). "
                         f"Received: labels of dtype {labels.dtype.name} and shape "
                         f"{labels.shape}")
    cardinality = int(dataset.cardinality())
    if cardinality == 0:
        raise ValueError(f"`{name}` yields no batch. Received: {name} with "
                         "cardinality 0")
    return cardinality


def _as_model_input(images, labels):
    # The engine's steps compare int32 class ids and compute in float32.
    return tf.cast(images, tf.float32), tf.reshape(tf.cast(labels, tf.int32), [-1])


class ExternalDatasets:
    """The engine's view of a caller's batched train and eval pipelines.

    Args:
        train: a checked (`check_pipeline`) `tf.data.Dataset` of (images, labels)
            batches.
        evals: the same for evaluation, or None (no evaluation).
        spec: the `DatasetSpec` (shape, classes, normalisation statistics of the
            net) written as dataset.json and used by the export.
        steps_per_epoch: train batches of one epoch.
    """

    def __init__(self, train, evals, spec, steps_per_epoch):
        self.train_split = train.map(_as_model_input)
        self.eval_split = None if evals is None else evals.map(_as_model_input)
        self.spec = spec
        self.steps_per_epoch = steps_per_epoch
        self.info = {}
        self.augmented = True  # unknown: never cache features of these

    def stage_steps(self, train, num_workers=1):
        """Train steps of an epoch (the `Datasets` interface; `train` is unused)."""
        del train, num_workers
        return self.steps_per_epoch

    def distributed_train(self, strategy, stage, epoch, train, skip_steps=0, source=None):
        """The train pipeline from its start, `skip_steps` batches skipped (a
        mid-epoch resume), distributed. An exact resume needs a pipeline whose order
        does not depend on the process (a seeded shuffle)."""
        del stage, epoch, train, source
        return strategy.experimental_distribute_dataset(
            self.train_split.skip(skip_steps).take(self.steps_per_epoch - skip_steps))

    def distributed_eval(self, strategy, source=None):
        """The eval pipeline distributed, or None without one."""
        del source
        if self.eval_split is None:
            return None
        return strategy.experimental_distribute_dataset(self.eval_split)

    @property
    def eval(self):
        """The eval pipeline (scoring every head at the end), or None."""
        return self.eval_split

    def close(self):
        """Nothing to free: the pipelines are the caller's."""


def external_spec(image_shape, num_classes, mean, std, class_names=None):
    """The `DatasetSpec` of a net trained on a caller's pipelines: inputs already
    at the net's size (`eval_resize` none), classes named by their ids unless
    `class_names` are given."""
    names = tuple(str(n) for n in class_names) if class_names is not None \
        else tuple(str(i) for i in range(num_classes))
    return DatasetSpec(tuple(image_shape), num_classes, names, "none",
                       mean=tuple(float(m) for m in mean),
                       std=tuple(float(s) for s in std))

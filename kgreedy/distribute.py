"""Choosing the tf.distribute strategy from `distribute.strategy`."""

import tensorflow as tf


def make_strategy(config):
    """Returns the strategy a recipe asks for.

    `auto` mirrors over all local GPUs when there are several, else uses the
    default strategy; `default` is the single-device default strategy; `mirrored`
    is MirroredStrategy (over `devices` when given); `multi_worker` is
    MultiWorkerMirroredStrategy configured by the `TF_CONFIG` environment variable.
    """
    if config.strategy == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "mirrored":
        return tf.distribute.MirroredStrategy(list(config.devices) if config.devices else None)
    return tf.distribute.MultiWorkerMirroredStrategy()

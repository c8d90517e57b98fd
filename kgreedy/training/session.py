"""What `kgreedy.train` and `kgreedy.tune` do before any work: devices, op
determinism, the data's description and the distribution strategy."""

import tensorflow as tf

from kgreedy import data
from kgreedy.training import distribute


def start(recipe):
    """Sets up TensorFlow for a train recipe; returns (`DatasetSpec`, strategy).

    Must run before TensorFlow's first op: logical devices and op determinism can
    only be configured then. Reads no pixels (`kgreedy.data.describe`).

    Raises:
        KgreedyError: the data cannot be found, or the strategy cannot be built.
    """
    distribute.configure_devices(recipe.distribute)
    if recipe.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    spec = data.describe(recipe.data)
    return spec, distribute.make_strategy(recipe.distribute)

"""Auxiliary classifiers ("heads") that train each new block, by name."""

import keras

from kgreedy.layers import ConvBlock, batch_norm_layer


@keras.saving.register_keras_serializable(package="kgreedy")
class AuxHead(keras.layers.Layer):
    """The paper's auxiliary problem on top of a new block (DESIGN.md section 1).

    k-1 conv3x3 -> [BN] -> ReLU layers of constant width, then an average pool to a
    `pool_size` x `pool_size` map (adaptive: any input size), [BN], flatten and one
    linear layer. With k=1 the head is "average pool + linear" and the block itself
    is the only hidden layer.

    Args:
        num_classes: outputs of the final linear layer (logits).
        k: hidden layers of the auxiliary problem, the block included (k >= 1).
        width: channels of the k-1 conv layers.
        pool_size: side of the pooled map.
        batch_norm: BN after each conv and after the pool.
        sync_batch_norm: BN statistics over all replicas (see `batch_norm_layer`).
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage2_head`).
    """

    def __init__(self, num_classes, k=2, width=128, pool_size=2, batch_norm=True,
                 sync_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"`k` must be >= 1. Received: k={k!r}")
        self.num_classes = num_classes
        self.k = k
        self.width = width
        self.pool_size = pool_size
        self.batch_norm = batch_norm
        self.sync_batch_norm = sync_batch_norm
        # One attribute per conv, not a list: TensorFlow checkpoints track a Keras
        # layer's sublayers through its attributes, and a plain list is skipped.
        for i in range(1, k):
            setattr(self, f"conv{i}", ConvBlock(width, "none", batch_norm, sync_batch_norm,
                                                     name=f"conv{i}"))
        self.pool = keras.layers.AdaptiveAveragePooling2D(pool_size, name="pool")
        self.bn = batch_norm_layer(synchronized=sync_batch_norm) if batch_norm else None
        self.flatten = keras.layers.Flatten(name="flatten")
        self.dense = keras.layers.Dense(num_classes, name="dense")

    @property
    def convs(self):
        """The k-1 conv3x3-BN-ReLU layers, in order."""
        return [getattr(self, f"conv{i}") for i in range(1, self.k)]

    def build(self, input_shape):
        n, _, _, channels = input_shape
        shape = input_shape
        for conv in self.convs:
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            channels = self.width
        if self.bn is not None:
            self.bn.build((n, self.pool_size, self.pool_size, channels))
        self.dense.build((n, self.pool_size * self.pool_size * channels))

    def call(self, inputs, training=None):
        x = inputs
        for conv in self.convs:
            x = conv(x, training=training)
        x = self.pool(x)
        if self.bn is not None:
            x = self.bn(x, training=training)
        return self.dense(self.flatten(x))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "k": self.k,
                "width": self.width, "pool_size": self.pool_size,
                "batch_norm": self.batch_norm, "sync_batch_norm": self.sync_batch_norm}


HEADS = {"conv": AuxHead}


def make_head(kind, **kwargs):
    """Builds a head by name (`conv`: the paper's auxiliary problem)."""
    if kind not in HEADS:
        raise ValueError(f"Unknown head {kind!r}; known heads: {sorted(HEADS)}. "
                         f"Received: kind={kind!r}")
    return HEADS[kind](**kwargs)

"""The head layers: auxiliary classifiers that train each new module, built from a
`kgreedy.config.designs.HeadDesign` by `make_head`."""

import math

import keras
import tensorflow as tf

from kgreedy.config.designs import HeadDesign
from kgreedy.config.vocabulary import HEAD_TYPES
from kgreedy.model.layers import ConvBlock, batch_norm_layer


def average_pool(size, name="pool"):
    """Adaptive average pooling of any map to `size` x `size`.

    An output side of 1 is global average pooling: Keras 3.15's
    `AdaptiveAveragePooling2D(1)` fails inside a `tf.function` (its "big" window is
    one pixel wider than the map), which made pool_size 1 untrainable. Either layer
    has no weights, so checkpoints are the same whichever is used.
    """
    if size == 1 or size == (1, 1):
        return keras.layers.GlobalAveragePooling2D(keepdims=True, name=name)
    return AveragePoolTo(size, name=name)


class AveragePoolTo(keras.layers.AdaptiveAveragePooling2D):
    """Keras' adaptive average pooling, as one average pool where the map's sides
    are multiples of the output's.

    Keras 3.15's adaptive pooling gathers its windows with slices, transposes and a
    segment sum, several times the cost of the pool itself on a CPU; where the
    windows tile the map exactly they are one pool's windows, and the averages are
    the same.
    """

    def call(self, inputs):
        h, w = inputs.shape[1:3]
        out_h, out_w = self.output_size
        if (self.data_format == "channels_last" and h and w and h % out_h == 0
                and w % out_w == 0):
            window = (h // out_h, w // out_w)
            return tf.nn.avg_pool2d(inputs, window, window, "VALID")
        return super().call(inputs)


def reduced_side(side, reduction, pool_size):
    """Side of a map after a head's reducing pool: ceil(side / reduction), never
    below `pool_size` and never above `side`."""
    return min(side, max(math.ceil(side / reduction), pool_size))


def _check_depth(k, reduction):
    """The checks of a conv or MLP-SR head's `k` and `reduction`."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1. Received: k={k!r}")
    if reduction < 1:
        raise ValueError(f"`reduction` must be >= 1. Received: reduction={reduction!r}")


@keras.saving.register_keras_serializable(package="kgreedy")
class AuxHead(keras.layers.Layer):
    """The paper's auxiliary problem on top of a new block (docs/DESIGN.md, "The method").

    [an average pool to 1/`reduction` of the side], k-1 conv3x3 -> [BN] -> ReLU
    layers of constant width, then an average pool to a `pool_size` x `pool_size`
    map (adaptive: any input size), [BN], flatten and one linear layer. With k=1 the
    head is "average pool + linear" and the block itself is the only hidden layer.

    Args:
        num_classes: outputs of the final linear layer (logits).
        k: hidden layers of the auxiliary problem, the block included (k >= 1).
        width: channels of the k-1 conv layers.
        pool_size: side of the pooled map.
        batch_norm: BN after each conv and after the pool.
        sync_batch_norm: BN statistics over all replicas (see `batch_norm_layer`).
        reduction: the convs run on the map averaged to 1/reduction of its side (the
            official VGG code halves it: 4x fewer FLOPs at 224x224); 1 keeps it.
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage2_head`).
    """

    def __init__(self, num_classes, k=2, width=128, pool_size=2, batch_norm=True,
                 sync_batch_norm=False, reduction=1, **kwargs):
        super().__init__(**kwargs)
        _check_depth(k, reduction)
        self.num_classes = num_classes
        self.k = k
        self.width = width
        self.pool_size = pool_size
        self.batch_norm = batch_norm
        self.sync_batch_norm = sync_batch_norm
        self.reduction = reduction
        self.reduce = None  # needs the input side: made in `build`
        # One attribute per conv, not a list: TensorFlow checkpoints track a Keras
        # layer's sublayers through its attributes, and a plain list is skipped.
        for i in range(1, k):
            setattr(self, f"conv{i}", ConvBlock(width, "none", batch_norm, sync_batch_norm,
                                                     name=f"conv{i}"))
        self.pool = average_pool(pool_size)
        self.bn = batch_norm_layer(synchronized=sync_batch_norm) if batch_norm else None
        self.flatten = keras.layers.Flatten(name="flatten")
        self.dense = keras.layers.Dense(num_classes, name="dense")

    @property
    def convs(self):
        """The k-1 conv3x3-BN-ReLU layers, in order."""
        return [getattr(self, f"conv{i}") for i in range(1, self.k)]

    def build(self, input_shape):
        n, h, w, channels = input_shape
        shape = input_shape
        if self.reduction > 1 and self.k > 1 and h is not None and w is not None:
            side = (reduced_side(h, self.reduction, self.pool_size),
                    reduced_side(w, self.reduction, self.pool_size))
            if side != (h, w):
                self.reduce = average_pool(side, name="reduce")
                shape = (n, *side, channels)
        for conv in self.convs:
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            channels = self.width
        if self.bn is not None:
            self.bn.build((n, self.pool_size, self.pool_size, channels))
        self.dense.build((n, self.pool_size * self.pool_size * channels))

    def call(self, inputs, training=None):
        x = inputs if self.reduce is None else self.reduce(inputs)
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
                "batch_norm": self.batch_norm, "sync_batch_norm": self.sync_batch_norm,
                "reduction": self.reduction}


@keras.saving.register_keras_serializable(package="kgreedy")
class MlpSrHead(keras.layers.Layer):
    """The MLP-SR auxiliary network of Decoupled Greedy Learning (Belilovsky et al. 2020).

    Spatial reduction first: an average pool to ceil(side / `reduction`) (never
    below `pool_size`, never above the input side); then k-1 conv1x1 -> [BN] ->
    ReLU layers of `width` channels; an average pool to `pool_size` x `pool_size`;
    flatten; `mlp_layers` dense -> [BN] -> ReLU layers of 4 x `width` units (DGL's
    flattened size at its 2x2 pool); one linear layer. Cheap next to the conv head:
    the 1x1 convs run on a map 16 times smaller. As in DGL, no BN after the pool.

    Args:
        num_classes: outputs of the final linear layer (logits).
        k: hidden layers of the auxiliary problem, the block included (k-1 conv1x1).
        width: channels of the conv1x1 layers.
        pool_size: side of the pooled map fed to the MLP.
        mlp_layers: hidden dense layers (DGL uses 3).
        reduction: the first pool divides the map's side by this.
        batch_norm: BN after each conv1x1 and hidden dense layer.
        sync_batch_norm: BN statistics over all replicas (see `batch_norm_layer`).
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage2_head`).
    """

    def __init__(self, num_classes, k=2, width=128, pool_size=2, mlp_layers=3, reduction=4,
                 batch_norm=True, sync_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        _check_depth(k, reduction)
        self.num_classes = num_classes
        self.k = k
        self.width = width
        self.pool_size = pool_size
        self.mlp_layers = mlp_layers
        self.reduction = reduction
        self.batch_norm = batch_norm
        self.sync_batch_norm = sync_batch_norm
        # One attribute per layer (see AuxHead). The reducing pool needs the input
        # side, so `build` creates it.
        self.reduce = None
        for i in range(1, k):
            setattr(self, f"conv{i}", keras.layers.Conv2D(
                width, 1, use_bias=not batch_norm, kernel_initializer="he_normal",
                name=f"conv{i}"))
            setattr(self, f"conv{i}_bn", batch_norm_layer(f"conv{i}_bn", sync_batch_norm)
                    if batch_norm else None)
        self.pool = average_pool(pool_size)
        self.flatten = keras.layers.Flatten(name="flatten")
        for i in range(1, mlp_layers + 1):
            setattr(self, f"mlp{i}", keras.layers.Dense(4 * width, name=f"mlp{i}"))
            setattr(self, f"mlp{i}_bn", batch_norm_layer(f"mlp{i}_bn", sync_batch_norm)
                    if batch_norm else None)
        self.dense = keras.layers.Dense(num_classes, name="dense")
        self.relu = keras.layers.ReLU(name="relu")

    def reduced_side(self, side):
        """Side of the map after the reducing pool, for an input of `side`."""
        return reduced_side(side, self.reduction, self.pool_size)

    def build(self, input_shape):
        n, h, w, channels = input_shape
        if h is not None and w is not None:
            if (self.reduced_side(h), self.reduced_side(w)) != (h, w):
                self.reduce = average_pool((self.reduced_side(h), self.reduced_side(w)),
                                           name="reduce")
            h, w = self.reduced_side(h), self.reduced_side(w)
        for i in range(1, self.k):
            getattr(self, f"conv{i}").build((n, h, w, channels))
            channels = self.width
            if self.batch_norm:
                getattr(self, f"conv{i}_bn").build((n, h, w, channels))
        features = self.pool_size * self.pool_size * channels
        for i in range(1, self.mlp_layers + 1):
            getattr(self, f"mlp{i}").build((n, features))
            features = 4 * self.width
            if self.batch_norm:
                getattr(self, f"mlp{i}_bn").build((n, features))
        self.dense.build((n, features))

    def call(self, inputs, training=None):
        x = inputs if self.reduce is None else self.reduce(inputs)
        for i in range(1, self.k):
            x = getattr(self, f"conv{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"conv{i}_bn")(x, training=training)
            x = self.relu(x)
        x = self.flatten(self.pool(x))
        for i in range(1, self.mlp_layers + 1):
            x = getattr(self, f"mlp{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"mlp{i}_bn")(x, training=training)
            x = self.relu(x)
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "k": self.k,
                "width": self.width, "pool_size": self.pool_size,
                "mlp_layers": self.mlp_layers, "reduction": self.reduction,
                "batch_norm": self.batch_norm, "sync_batch_norm": self.sync_batch_norm}


@keras.saving.register_keras_serializable(package="kgreedy")
class LinearHead(keras.layers.Layer):
    """A linear classifier on the block's output: average pool to `pool_size` x
    `pool_size`, flatten, one linear layer; no hidden layer and no BN.

    It differs from `AuxHead` with k=1 only by the missing BN before the linear
    layer: the plainest probe of what the block has learnt.

    Args:
        num_classes: outputs of the linear layer (logits).
        pool_size: side of the pooled map.
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage2_head`).
    """

    def __init__(self, num_classes, pool_size=2, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.pool_size = pool_size
        self.pool = average_pool(pool_size)
        self.flatten = keras.layers.Flatten(name="flatten")
        self.dense = keras.layers.Dense(num_classes, name="dense")

    def build(self, input_shape):
        n, _, _, channels = input_shape
        self.dense.build((n, self.pool_size * self.pool_size * channels))

    def call(self, inputs, training=None):
        del training  # nothing behaves differently in training
        return self.dense(self.flatten(self.pool(inputs)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "pool_size": self.pool_size}


@keras.saving.register_keras_serializable(package="kgreedy")
class VggHead(keras.layers.Layer):
    """VGG's own classifier as a head: the trunk's last max-pool, flatten, two
    FC-`units` -> ReLU -> dropout layers and a linear layer (Simonyan & Zisserman
    2015; torchvision's `vgg11_bn.classifier`).

    On a 14x14x512 map (VGG-11 at 224x224) this is torchvision's classifier exactly:
    its adaptive pool to 7x7 is then the identity. On smaller inputs the FC layers
    take the pooled map as it is (512 features at 32x32) instead of copying it up to
    7x7.

    Args:
        num_classes: outputs of the final linear layer (logits).
        units: width of the two hidden FC layers.
        dropout: dropout rate after each hidden FC layer (training only).
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage8_head`).
    """

    def __init__(self, num_classes, units=4096, dropout=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.units = units
        self.dropout = dropout
        self.pool = keras.layers.MaxPooling2D(2, name="maxpool")
        self.flatten = keras.layers.Flatten(name="flatten")
        self.fc1 = keras.layers.Dense(units, activation="relu", name="fc1")
        self.drop1 = keras.layers.Dropout(dropout, name="drop1")
        self.fc2 = keras.layers.Dense(units, activation="relu", name="fc2")
        self.drop2 = keras.layers.Dropout(dropout, name="drop2")
        self.dense = keras.layers.Dense(num_classes, name="dense")

    def build(self, input_shape):
        n, h, w, channels = input_shape
        self.fc1.build((n, (h // 2) * (w // 2) * channels))
        self.fc2.build((n, self.units))
        self.dense.build((n, self.units))

    def call(self, inputs, training=None):
        x = self.flatten(self.pool(inputs))
        x = self.drop1(self.fc1(x), training=training)
        x = self.drop2(self.fc2(x), training=training)
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "units": self.units, "dropout": self.dropout}


# The recipe's head names (config.vocabulary.HEAD_TYPES), in its order, to their layers.
HEADS = dict(zip(HEAD_TYPES, (AuxHead, MlpSrHead, LinearHead, VggHead)))


def make_head(design, num_classes, *, channels=None, batch_norm=True,
              sync_batch_norm=False, name=None):
    """Builds the head layer of a `HeadDesign`: `conv` (the paper's auxiliary
    problem), `mlp_sr` (DGL's MLP-SR), `linear` or `vgg` (VGG's classifier).

    Each kind takes the design's fields it uses (`HEAD_FIELDS`); a `reduction` of
    None leaves the layer's default (conv 1, mlp_sr 4).

    Args:
        design: a `kgreedy.config.designs.HeadDesign`.
        num_classes: outputs of the head (logits).
        channels: the module's output channels, what width "auto" means.
        batch_norm: BN in conv and mlp_sr heads.
        sync_batch_norm: BN statistics over all replicas, in those heads.
        name: the layer's name (like `stage2_head`).

    Raises:
        ValueError: `design` is not a HeadDesign, its kind is `model` (the split
            model's own classifier, a layer already), or width "auto" without
            `channels`.
    """
    if not isinstance(design, HeadDesign):
        raise ValueError(f"`design` must be a HeadDesign. Received: design={design!r}")
    if design.kind not in HEADS:
        raise ValueError(f"Head {design.kind!r} is a model's own classifier, not a layer "
                         f"made from a design; known heads: {sorted(HEADS)}. "
                         f"Received: kind={design.kind!r}")
    if design.kind == "vgg":
        return VggHead(num_classes, name=name)
    if design.kind == "linear":
        return LinearHead(num_classes, pool_size=design.pool_size, name=name)
    width = channels if design.width == "auto" else design.width
    if width is None:
        raise ValueError("Width 'auto' is the module's output channels: pass `channels`. "
                         f"Received: width={design.width!r}, channels=None")
    default = {} if design.reduction is None else {"reduction": design.reduction}
    return HEADS[design.kind](num_classes, k=design.k, width=width,
                              pool_size=design.pool_size, batch_norm=batch_norm,
                              sync_batch_norm=sync_batch_norm, name=name, **default)

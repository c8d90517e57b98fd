"""Residual networks of He et al. (2016) as functional Keras trunks, to be split into
modules (`kgreedy.model.split`).

Layers are named as in `keras.applications` (`conv1_relu`, `conv2_block3_out`, ...),
so a recipe's `model.split_at` reads the same for a named ResNet and for
`keras.applications.ResNet50`. Each trunk ends at its last block's output; the
classifier (global average pool and one linear layer) is the last stage's head
(`aux.last_head: model`, `classifier_head`).
"""

import keras
import tensorflow as tf

from kgreedy.model.layers import batch_norm_layer

# depth: (block kind, blocks per group)
IMAGENET_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                   50: ("bottleneck", (3, 4, 6, 3))}
CIFAR_DEPTHS = (20, 32, 56, 110)


@keras.saving.register_keras_serializable(package="kgreedy")
class ZeroPadShortcut(keras.layers.Layer):
    """He et al.'s option A shortcut: subsample by `stride`, zero-pad the channels.

    Parameter-free, as in the paper's CIFAR ResNets (0.27 M parameters for
    ResNet-20): the extra channels are split evenly before and after the input's.

    Args:
        stride: spatial subsampling (1 or 2).
        channels: output channels (at least the input's).
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, stride, channels, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride
        self.channels = channels

    def call(self, inputs):
        x = inputs[:, ::self.stride, ::self.stride, :]
        extra = self.channels - inputs.shape[-1]
        if extra:
            x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
        return x

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        s = self.stride
        return (n, None if h is None else -(-h // s), None if w is None else -(-w // s),
                self.channels)

    def get_config(self):
        return {**super().get_config(), "stride": self.stride, "channels": self.channels}


def _conv_bn(x, filters, size, stride, name, sync, relu=True):
    x = keras.layers.Conv2D(filters, size, strides=stride, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = batch_norm_layer(f"{name}_bn", sync)(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, stride, name, sync, shortcut):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""
    y = _conv_bn(x, filters, 3, stride, f"{name}_1", sync)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", sync, relu=False)
    if stride != 1 or x.shape[-1] != filters:
        if shortcut == "pad":
            x = ZeroPadShortcut(stride, filters, name=f"{name}_0_pad")(x)
        else:
            x = _conv_bn(x, filters, 1, stride, f"{name}_0", sync, relu=False)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _bottleneck_block(x, filters, stride, name, sync):
    """conv1x1-conv3x3 (stride here, as torchvision's ResNet v1.5)-conv1x1 (4x wide),
    each with BN, plus a projection shortcut where the shape changes."""
    y = _conv_bn(x, filters, 1, 1, f"{name}_1", sync)
    y = _conv_bn(y, filters, 3, stride, f"{name}_2", sync)
    y = _conv_bn(y, 4 * filters, 1, 1, f"{name}_3", sync, relu=False)
    if stride != 1 or x.shape[-1] != 4 * filters:
        x = _conv_bn(x, 4 * filters, 1, stride, f"{name}_0", sync, relu=False)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def cifar_resnet(depth, input_shape, sync_batch_norm=False, name=None):
    """The CIFAR ResNet-`depth` trunk (He et al. 2016, section 4.2).

    conv3x3(16)-BN-ReLU, then three groups of n = (depth-2)/6 basic blocks of 16,
    32 and 64 channels, the first block of groups 3 and 4 with stride 2 and an
    option A (zero-padding) shortcut. Groups are numbered 2-4 as in
    `keras.applications`: the blocks' outputs are `conv2_block1_out` ...
    `conv4_block{n}_out`. With the classifier head, ResNet-20/32/56/110 have
    0.27/0.46/0.85/1.7 M parameters at 10 classes.

    Raises:
        ValueError: `depth` is not 6n+2.
    """
    if depth not in CIFAR_DEPTHS and (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110). "
                         f"Received: depth={depth!r}")
    n = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="images")
    x = _conv_bn(inputs, 16, 3, 1, "conv1", sync_batch_norm)
    for group, filters in enumerate((16, 32, 64), start=2):
        for b in range(1, n + 1):
            stride = 2 if group > 2 and b == 1 else 1
            x = _basic_block(x, filters, stride, f"conv{group}_block{b}",
                             sync_batch_norm, shortcut="pad")
    return keras.Model(inputs, x, name=name or f"resnet{depth}")


def imagenet_resnet(depth, input_shape, sync_batch_norm=False, name=None):
    """The ImageNet ResNet-18/34 (basic blocks) or ResNet-50 (bottleneck) trunk.

    conv7x7(64, stride 2)-BN-ReLU, max-pool 3x3 stride 2, four groups of 64, 128,
    256 and 512 (x4 for bottlenecks) channels, stride 2 at the first block of
    groups 3-5, projection shortcuts (conv1x1-BN) where the shape changes. Layer
    names follow `keras.applications.ResNet50`. With the classifier head at 1000
    classes: 11,689,512 / 21,797,672 / 25,557,032 parameters, as torchvision's.

    Raises:
        ValueError: `depth` is not 18, 34 or 50.
    """
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}. "
                         f"Received: depth={depth!r}")
    kind, counts = IMAGENET_DEPTHS[depth]
    inputs = keras.Input(input_shape, name="images")
    x = _conv_bn(inputs, 64, 7, 2, "conv1", sync_batch_norm)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")(x)
    for group, (filters, count) in enumerate(zip((64, 128, 256, 512), counts), start=2):
        for b in range(1, count + 1):
            stride = 2 if group > 2 and b == 1 else 1
            block_name = f"conv{group}_block{b}"
            if kind == "basic":
                x = _basic_block(x, filters, stride, block_name, sync_batch_norm,
                                 shortcut="projection")
            else:
                x = _bottleneck_block(x, filters, stride, block_name, sync_batch_norm)
    return keras.Model(inputs, x, name=name or f"resnet{depth}")


def resnet(family, depth, input_shape, sync_batch_norm=False, classes=None):
    """A named ResNet: `family` is `cifar` or `imagenet` (see the functions above).

    With `classes`, the network's own classifier follows the trunk: global average
    pool (`avg_pool`) and a linear layer of `classes` logits (`predictions`), as in
    He et al. and `keras.applications`.
    """
    build = cifar_resnet if family == "cifar" else imagenet_resnet
    trunk = build(depth, input_shape, sync_batch_norm)
    if classes is None:
        return trunk
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(trunk.outputs[0])
    x = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(trunk.inputs[0], x, name=trunk.name)

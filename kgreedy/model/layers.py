"""Layers of the trunk: the invertible downsampling psi, the conv block, input scaling."""

import keras
import tensorflow as tf

from kgreedy.config.vocabulary import DOWNSAMPLES


BN_MOMENTUM = 0.9  # Keras' name for PyTorch's momentum 0.1


def batch_norm_layer(name="bn", synchronized=False):
    """`BatchNorm` with PyTorch's defaults, as in the paper's code.

    PyTorch's momentum 0.1 is Keras' momentum 0.9 (Keras' 0.99 default adapts the
    moving statistics ten times slower, which hurts short greedy stages).
    `synchronized` computes batch statistics over all replicas of a
    tf.distribute strategy instead of per replica.
    """
    return BatchNorm(momentum=BN_MOMENTUM, epsilon=1e-5, synchronized=synchronized,
                     name=name)


@keras.saving.register_keras_serializable(package="kgreedy")
class BatchNorm(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, computed by TensorFlow's fused kernel where it can be.

    Keras 3 normalises with separate ops (moments, multiplies, sums, and as many
    again for the gradient), which TensorFlow's CPU build runs as Eigen kernels
    compiled for SSE; the fused kernel is oneDNN's, which uses the CPU's AVX2 or
    AVX-512 (docs/performance.md, "Speed on AVX2 CPUs"). The weights, the moving
    statistics' update (Keras' momentum, the biased batch variance) and the outputs
    are Keras' own up to float rounding. Statistics are computed in float32, as
    Keras does. Inputs other than 4-D channels-last, a mask, renorm, synchronised
    statistics, a layer without scale or center, or `fused=False` take Keras' path.

    Args:
        fused: use the fused kernel where it applies.
        **kwargs: `keras.layers.BatchNormalization` arguments.
    """

    def __init__(self, fused=True, **kwargs):
        super().__init__(**kwargs)
        self.fused = bool(fused)

    def _fuses(self, inputs, mask):
        return (self.fused and mask is None and not self.synchronized and not self.renorm
                and self.scale and self.center and len(inputs.shape) == 4
                and self.axis in (-1, 3))

    def call(self, inputs, training=None, mask=None):
        if not self._fuses(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
            # The kernel returns the unbiased variance; Keras' moving variance
            # averages the biased one.
            count = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * tf.maximum(count - 1.0, 0.0) / count
            self.moving_mean.assign(self.moving_mean * self.momentum
                                    + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, mean=self.moving_mean,
                variance=self.moving_variance, epsilon=self.epsilon, is_training=False)
        return tf.cast(y, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "fused": self.fused}


@keras.saving.register_keras_serializable(package="kgreedy")
class InvertibleDownsampling(keras.layers.Layer):
    """The paper's invertible downsampling psi: space-to-depth.

    Maps [N, H, W, C] to [N, H/b, W/b, b*b*C] by moving each b x b spatial patch
    into channels. In channels-last layout this equals the official code's psi bit
    for bit. `inverse` undoes it exactly.

    Args:
        block_size: side of the patch moved into channels (the paper uses 2).
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, block_size=2, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"`block_size` must be an integer >= 2. Received: "
                             f"block_size={block_size!r}")
        self.block_size = block_size

    def call(self, inputs):
        return tf.nn.space_to_depth(inputs, self.block_size)

    def inverse(self, outputs):
        """Depth-to-space: `inverse(call(x)) == x` exactly."""
        return tf.nn.depth_to_space(outputs, self.block_size)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        b = self.block_size
        return (n, None if h is None else h // b, None if w is None else w // b,
                None if c is None else c * b * b)

    def get_config(self):
        return {**super().get_config(), "block_size": self.block_size}


@keras.saving.register_keras_serializable(package="kgreedy")
class ConvBlock(keras.layers.Layer):
    """One trunk block: [downsampling] -> conv3x3 -> [BN] -> ReLU.

    Args:
        width: output channels of the conv.
        downsample: `none`, `psi` (space-to-depth), `maxpool`, `avgpool` (2x2,
            stride 2) or `stride` (the conv itself has stride 2).
        batch_norm: BN after the conv.
        sync_batch_norm: BN statistics over all replicas (see `batch_norm_layer`).
        use_bias: the conv has a bias (default: only without BN, where it is not
            redundant; torchvision's VGG keeps it before BN too).
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage2_block`).
    """

    def __init__(self, width, downsample="none", batch_norm=True, sync_batch_norm=False,
                 use_bias=None, **kwargs):
        super().__init__(**kwargs)
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"`downsample` must be one of {DOWNSAMPLES}. Received: "
                             f"downsample={downsample!r}")
        self.width = width
        self.downsample = downsample
        self.batch_norm = batch_norm
        self.sync_batch_norm = sync_batch_norm
        self.use_bias = (not batch_norm) if use_bias is None else bool(use_bias)
        self.pool = {
            "psi": lambda: InvertibleDownsampling(2, name="psi"),
            "maxpool": lambda: keras.layers.MaxPooling2D(2, name="maxpool"),
            "avgpool": lambda: keras.layers.AveragePooling2D(2, name="avgpool"),
        }.get(downsample, lambda: None)()
        self.conv = keras.layers.Conv2D(
            width, 3, strides=2 if downsample == "stride" else 1, padding="same",
            use_bias=self.use_bias, kernel_initializer="he_normal", name="conv")
        self.bn = batch_norm_layer(synchronized=sync_batch_norm) if batch_norm else None
        self.relu = keras.layers.ReLU(name="relu")

    def build(self, input_shape):
        shape = input_shape
        if self.pool is not None:
            self.pool.build(shape)
            shape = self.pool.compute_output_shape(shape)
        self.conv.build(shape)
        if self.bn is not None:
            self.bn.build(self.conv.compute_output_shape(shape))

    def call(self, inputs, training=None):
        x = inputs if self.pool is None else self.pool(inputs)
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x, training=training)
        return self.relu(x)

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        if self.downsample != "none":
            h = None if h is None else h // 2
            w = None if w is None else w // 2
        return (n, h, w, self.width)

    def get_config(self):
        return {**super().get_config(), "width": self.width,
                "downsample": self.downsample, "batch_norm": self.batch_norm,
                "sync_batch_norm": self.sync_batch_norm, "use_bias": self.use_bias}


def conv_blocks(blocks, batch_norm=True, sync_batch_norm=False, conv_bias=False):
    """The modules of a plain trunk: one `ConvBlock` per `{"width", "downsample"}`,
    named `stage{j}_block`.

    Args:
        blocks: per stage, `{"width": int, "downsample": one of DOWNSAMPLES}`.
        batch_norm: BN after every conv.
        sync_batch_norm: BN statistics over all replicas.
        conv_bias: the convs keep a bias even before BN.
    """
    return [ConvBlock(b["width"], b.get("downsample", "none"), batch_norm, sync_batch_norm,
                      use_bias=True if conv_bias else None, name=f"stage{j}_block")
            for j, b in enumerate(blocks, start=1)]


@keras.saving.register_keras_serializable(package="kgreedy")
class Standardize(keras.layers.Layer):
    """(x - mean) / std per channel, with the dataset's statistics as constants.

    Part of the model, so training, evaluation and the exported SavedModel apply
    the very same normalisation to raw pixel values.

    Args:
        mean: per-channel means on the raw pixel scale.
        std: per-channel standard deviations on the raw pixel scale.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def call(self, inputs):
        mean = tf.constant(self.mean, dtype=inputs.dtype)
        inv_std = tf.constant([1.0 / s for s in self.std], dtype=inputs.dtype)
        return (inputs - mean) * inv_std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}

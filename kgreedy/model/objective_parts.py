"""The layers and per-example losses of InfoPro's local objectives (Wang et al.,
*Revisiting Locally Supervised Learning*, ICLR 2021): the reconstruction decoder and
its binary cross-entropy (section 3), the projection head and the supervised
contrastive loss (Khosla et al., NeurIPS 2020), and the per-module loss weights.
`kgreedy.model.objectives` puts them together per module.
"""

import keras
import tensorflow as tf

from kgreedy.model.layers import batch_norm_layer

TEMPERATURE = 0.07  # the official code's and Khosla et al.'s CIFAR temperature
_EPSILON = 1e-7  # keras.config.epsilon(): the clip that keeps log() finite in the BCE

def _float32(x):
    return tf.cast(x, tf.float32)


@keras.saving.register_keras_serializable(package="kgreedy")
class ReconstructionDecoder(keras.layers.Layer):
    """InfoPro's decoder (section 3; the official `Decoder`): rebuilds the input image
    from a module's output.

    The map is resized to the image (bilinear, half-pixel grid), conv3x3 -> [BN] -> ReLU
    of `width` channels, a conv3x3 to the image's channels and a sigmoid. The
    sigmoid runs in float32 so a bfloat16 run keeps its [0, 1] output (and the BCE's
    logs) exact at the ends.

    Args:
        image_shape: (H, W, C) of the input image, the reconstruction's shape.
        width: channels of the hidden conv (the official code's 12).
        batch_norm: BN after the hidden conv.
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage2_decoder`).
    """

    def __init__(self, image_shape, width=12, batch_norm=True, **kwargs):
        super().__init__(**kwargs)
        if len(image_shape) != 3:
            raise ValueError(f"`image_shape` must be (H, W, C). Received: "
                             f"image_shape={image_shape!r}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.width = width
        self.batch_norm = batch_norm
        # The official hidden conv keeps its bias before BN, where it is redundant.
        self.conv = keras.layers.Conv2D(width, 3, padding="same", use_bias=not batch_norm,
                                        kernel_initializer="he_normal", name="conv")
        self.bn = batch_norm_layer() if batch_norm else None
        self.relu = keras.layers.ReLU(name="relu")
        self.out = keras.layers.Conv2D(self.image_shape[2], 3, padding="same", name="out")
        self.sigmoid = keras.layers.Activation("sigmoid", dtype="float32", name="sigmoid")

    def build(self, input_shape):
        h, w, _ = self.image_shape
        shape = (input_shape[0], h, w, input_shape[-1])
        self.conv.build(shape)
        shape = (input_shape[0], h, w, self.width)
        if self.bn is not None:
            self.bn.build(shape)
        self.out.build(shape)

    def call(self, features, training=None):
        h, w, _ = self.image_shape
        # tf.image.resize answers float32 whatever it is given, and its gradient is
        # float32 too: resized in float32 from an explicit cast (whose gradient casts
        # back, so XLA never adds a float32 gradient to a bfloat16 one), then back to
        # the layer's compute dtype, so the convs run in bfloat16 under a mixed policy.
        x = tf.image.resize(tf.cast(features, tf.float32), (h, w), method="bilinear")
        x = tf.cast(x, self.compute_dtype)
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x, training=training)
        return self.sigmoid(self.out(self.relu(x)))

    def get_config(self):
        return {**super().get_config(), "image_shape": list(self.image_shape),
                "width": self.width, "batch_norm": self.batch_norm}


def reconstruction_loss(images01, reconstruction):
    """Per-example binary cross-entropy of a reconstruction, mean over pixels and
    channels, in float32; shape [B].

    Args:
        images01: the input images scaled to [0, 1] (the target), [B, H, W, C].
        reconstruction: the decoder's output in [0, 1], same shape. It is clipped to
            [1e-7, 1 - 1e-7] (Keras' epsilon) so that the logs stay finite.
    """
    target = _float32(images01)
    p = tf.clip_by_value(_float32(reconstruction), _EPSILON, 1.0 - _EPSILON)
    bce = -(target * tf.math.log(p) + (1.0 - target) * tf.math.log(1.0 - p))
    return tf.reduce_mean(tf.reshape(bce, [tf.shape(bce)[0], -1]), axis=1)


@keras.saving.register_keras_serializable(package="kgreedy")
class ProjectionHead(keras.layers.Layer):
    """The contrastive projection head of InfoPro (the official `AuxClassifier` in its
    default `1c2f` form): conv3x3 -> [BN] -> ReLU, global average pool, dense -> ReLU,
    dense to `dim`, L2 normalisation. Rows of the output have unit norm.

    The conv has stride 2 where the map is large: the official head strides on the
    16- and 32-channel stages of its CIFAR ResNets (maps of side 32 and 16) and not on
    the 64-channel one (side 8), so here a map whose smaller side exceeds
    `stride_above` is halved. Where it strides the official conv also doubles the
    channels; `width=None` does the same.

    Args:
        dim: size of the embedding (the official `feature_dim`, 128); the hidden
            dense layer has `dim` units too, as there.
        width: channels of the conv; None: the input's channels, doubled where the conv
            strides (the official choice).
        batch_norm: BN after the conv (which then has no bias).
        stride_above: the conv strides when min(H, W) > this.
        **kwargs: base `keras.layers.Layer` arguments (`name` like `stage2_projection`).
    """

    def __init__(self, dim=128, width=None, batch_norm=True, stride_above=8, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.width = width
        self.batch_norm = batch_norm
        self.stride_above = stride_above
        self.conv = None  # its stride and width need the input's shape: made in `build`
        self.bn = batch_norm_layer() if batch_norm else None
        self.relu = keras.layers.ReLU(name="relu")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.hidden = keras.layers.Dense(dim, activation="relu", name="hidden")
        self.dense = keras.layers.Dense(dim, name="dense")

    def strides(self, input_shape):
        """2 where the map's smaller side exceeds `stride_above` (an unknown side: 1)."""
        h, w = input_shape[1], input_shape[2]
        return 2 if h is not None and w is not None and min(h, w) > self.stride_above else 1

    def build(self, input_shape):
        n, h, w, channels = input_shape
        strides = self.strides(input_shape)
        width = self.width if self.width is not None else channels * strides
        self.conv = keras.layers.Conv2D(width, 3, strides=strides, padding="same",
                                        use_bias=not self.batch_norm,
                                        kernel_initializer="he_normal", name="conv")
        self.conv.build(input_shape)
        shape = self.conv.compute_output_shape(input_shape)
        if self.bn is not None:
            self.bn.build(shape)
        self.hidden.build((n, width))
        self.dense.build((n, self.dim))

    def call(self, features, training=None):
        x = self.conv(features)
        if self.bn is not None:
            x = self.bn(x, training=training)
        x = self.dense(self.hidden(self.pool(self.relu(x))))
        # Normalised in float32: a bfloat16 norm would leave rows visibly off 1.
        return tf.math.l2_normalize(_float32(x), axis=-1, epsilon=1e-12)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "width": self.width,
                "batch_norm": self.batch_norm, "stride_above": self.stride_above}


def supervised_contrastive_loss(embeddings, labels, temperature=TEMPERATURE):
    """Per-anchor supervised contrastive loss (Khosla et al. 2020, eq. 2, L_out), float32.

    For anchor i with positives P(i) (the other examples of its class) and A(i) (every
    example but i): -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a in A(i)}
    exp(z_i.z_a / t)), the average over positives outside the log. As in the official
    code, the factor t / base_t is 1.

    Negatives come from the batch given: under a tf.distribute strategy, the replica's
    own batch unless the caller gathers the global one first (the engine decides).

    An anchor without a positive in the batch has no term: its entry is 0 and it is
    left out of the mean: the other entries are scaled by B / (their number), so the
    plain mean of the result (the engine's for any per-example loss) is the mean over
    anchors with a positive. (The official code counts such anchors as 0 in its mean,
    which shrinks a batch's loss.) A batch without any positive gives zeros.

    Args:
        embeddings: [B, D] rows of unit norm (a `ProjectionHead`'s output).
        labels: [B] (or [B, 1]) integer classes.
        temperature: t.

    Returns:
        [B] float32.
    """
    z = _float32(embeddings)
    labels = tf.reshape(labels, [-1])
    n = tf.shape(z)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    self_mask = tf.eye(n, dtype=tf.bool)
    # A large finite value, not -inf, keeps i out of its own denominator: with B=1
    # the log-sum-exp stays finite and 0 * log_prob below stays 0, not NaN.
    others = tf.where(self_mask, tf.constant(-1e9, tf.float32), logits)
    log_prob = logits - tf.reduce_logsumexp(others, axis=1, keepdims=True)
    positives = tf.cast(tf.logical_and(tf.equal(labels[:, None], labels[None, :]),
                                       tf.logical_not(self_mask)), tf.float32)
    count = tf.reduce_sum(positives, axis=1)
    per_anchor = -tf.reduce_sum(positives * log_prob, axis=1) / tf.maximum(count, 1.0)
    has_positive = tf.cast(count > 0, tf.float32)
    scale = tf.cast(n, tf.float32) / tf.maximum(tf.reduce_sum(has_positive), 1.0)
    return per_anchor * has_positive * scale


@keras.saving.register_keras_serializable(package="kgreedy")
class LossWeights(keras.layers.Layer):
    """A module's (w_rec, w_task) and their weighted sum, in float32; no variables. A
    part like the others, so `losses` cannot pair one stage's parts with another's weights.

    Args:
        w_rec: weight of the reconstruction loss.
        w_task: weight of the task loss (cross-entropy or contrastive).
        **kwargs: base `keras.layers.Layer` arguments; the dtype is float32.
    """

    def __init__(self, w_rec, w_task, **kwargs):
        kwargs["dtype"] = "float32"  # the sum of float32 losses, whatever the policy
        super().__init__(**kwargs)
        self.w_rec = float(w_rec)
        self.w_task = float(w_task)

    def call(self, reconstruction, task):
        return self.w_rec * _float32(reconstruction) + self.w_task * _float32(task)

    def get_config(self):
        return {**super().get_config(), "w_rec": self.w_rec, "w_task": self.w_task}


def cross_entropy(labels, logits):
    """Per-example sparse softmax cross-entropy of logits, in float32; shape [B]."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(tf.reshape(labels, [-1]), tf.int32), logits=_float32(logits))

"""kgreedy's BatchNorm (TensorFlow's fused kernel behind Keras' layer) and AveragePoolTo
(one pool where adaptive pooling's windows tile the map) compute what Keras' own
layers compute: outputs, gradients and moving statistics, up to float rounding."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy.model.head_layers import AveragePoolTo
from kgreedy.model.layers import BatchNorm, batch_norm_layer


def twins(**kwargs):
    """A fused BatchNorm and Keras' path with the same (non-trivial) weights."""
    layers = [BatchNorm(momentum=0.9, epsilon=1e-5, fused=f, **kwargs) for f in (True, False)]
    rng = np.random.default_rng(0)
    for layer in layers:
        layer.build((None, 5, 3, 4))
    values = [rng.normal(size=4).astype("float32") for _ in range(2)]
    values += [rng.normal(size=4).astype("float32"), rng.uniform(0.5, 2, 4).astype("float32")]
    for layer in layers:
        layer.set_weights(values)
    return layers


def test_fused_batch_norm_trains_as_keras_does():
    fused, plain = twins()
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, size=(6, 5, 3, 4)), tf.float32)
    results = []
    for layer in (fused, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.range(4, dtype=tf.float32))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        for _ in range(2):  # the moving statistics follow Keras' update step after step
            layer(x * 1.5 + 1.0, training=True)
        results.append([y, *grads, layer.moving_mean, layer.moving_variance,
                        layer(x, training=False)])
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-4)
    # The fused kernel really ran (its op is in the traced graph); Keras' did not.
    graph = tf.function(lambda t: fused(t, training=True)).get_concrete_function(x).graph
    assert any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())


def test_a_frozen_batch_norm_uses_its_moving_statistics():
    fused, plain = twins()
    fused.trainable = plain.trainable = False
    x = tf.random.normal([4, 5, 3, 4], seed=2)
    np.testing.assert_allclose(fused(x, training=True), plain(x, training=True), atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean, plain.moving_mean)  # not updated


def test_under_bfloat16_statistics_are_float32_and_outputs_bfloat16():
    fused, plain = twins(dtype="mixed_bfloat16")
    x = tf.cast(tf.random.normal([4, 5, 3, 4], seed=3), tf.bfloat16)
    y, z = fused(x, training=True), plain(x, training=True)
    assert y.dtype == z.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(z, tf.float32), atol=2e-2)
    np.testing.assert_allclose(fused.moving_variance, plain.moving_variance, rtol=1e-4)


@pytest.mark.parametrize("shape, kwargs", [((4, 6), {}), ((2, 3, 3, 4), {"axis": 1}),
                                           ((2, 3, 3, 4), {"synchronized": True})])
def test_what_the_kernel_cannot_take_goes_through_keras(shape, kwargs):
    """2-D inputs, channels-first and synchronised statistics: Keras' own path."""
    layer = BatchNorm(**kwargs)
    x = tf.random.normal(shape, seed=4)
    graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(x).graph
    assert not any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())


def test_batch_norm_config_round_trips_and_serialises():
    layer = batch_norm_layer("bn")
    assert isinstance(layer, BatchNorm) and layer.fused and layer.momentum == 0.9
    again = BatchNorm.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    assert not BatchNorm(fused=False).get_config()["fused"]
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is BatchNorm


@pytest.mark.parametrize("shape, size", [((2, 8, 8, 3), (2, 2)), ((2, 12, 8, 3), (3, 2)),
                                         ((2, 7, 9, 3), (2, 2)), ((2, 8, 8, 3), (3, 3))])
def test_average_pool_to_equals_adaptive_pooling(shape, size):
    """Where the windows tile the map, one pool (one op in the graph); elsewhere
    Keras' adaptive pooling itself. Outputs and gradients are Keras' either way."""
    x = tf.random.normal(shape, seed=5)
    ours, theirs = AveragePoolTo(size), keras.layers.AdaptiveAveragePooling2D(size)
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * y)
        results.append((y, tape.gradient(loss, x)))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    graph = tf.function(ours).get_concrete_function(x).graph
    tiles = shape[1] % size[0] == 0 and shape[2] % size[1] == 0
    types = {op.type for op in graph.get_operations()}
    assert (types == {"Placeholder", "AvgPool", "Identity"}) == tiles, types

"""Splitting a Keras model into modules (`kgreedy.model.split`): the composed modules
are the model, bit for bit, on the model's own weights; split points a connection
spans, out of order, unknown or used twice are refused with one line naming the
layer; balanced splits of a ResNet; a classifier's trunk and top."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy.base.errors import KgreedyError
from kgreedy.model import resnets
from kgreedy.model.split import (SplitError, balanced_split_points, layer_span,
                                 split_model, split_points, trunk_and_top)


def residual_model(classes=None):
    """conv-BN-ReLU, an identity residual block, a max-pool, a block with a projection
    shortcut (conv1x1-BN), ReLU [, global average pool, dense]."""
    inputs = keras.Input((12, 12, 3), name="images")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="b1_conv")(x)
    y = keras.layers.BatchNormalization(name="b1_bn")(y)
    x = keras.layers.Add(name="b1_add")([x, y])
    x = keras.layers.ReLU(name="b1_out")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="b2_conv")(x)
    y = keras.layers.BatchNormalization(name="b2_bn")(y)
    s = keras.layers.Conv2D(16, 1, use_bias=False, name="b2_proj")(x)
    s = keras.layers.BatchNormalization(name="b2_proj_bn")(s)
    x = keras.layers.Add(name="b2_add")([s, y])
    x = keras.layers.ReLU(name="b2_out")(x)
    if classes:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, x, name="tiny_residual")


def randomise_batch_norm(model, seed=0):
    """Non-trivial BN statistics and affine weights, so inference mode matters."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.3, c).astype("float32"))


def compose(modules, x):
    for module in modules:
        x = module(x, training=False)
    return x


def count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def assert_shares_weights(model, modules):
    """Every module weight is one of the model's variables (the same object), no
    weight is in two modules, and together they are all of the model's."""
    model_ids = {id(w) for w in model.weights}
    seen = []
    for module in modules:
        assert {id(w) for w in module.weights} <= model_ids, module.name
        seen += [id(w) for w in module.weights]
    assert len(seen) == len(set(seen))
    assert set(seen) == model_ids
    assert sum(m.count_params() for m in modules) == model.count_params()
    assert (sum(count(m.trainable_weights) for m in modules)
            == count(model.trainable_weights))


# ------------------------------------------------------- the bitwise test ----

def test_tiny_residual_model_split_at_three_layers_is_the_model_bit_for_bit():
    model = residual_model(classes=5)
    randomise_batch_norm(model)
    x = tf.random.stateless_normal([4, 12, 12, 3], seed=[1, 2])
    expected = model(x, training=False).numpy()

    modules = split_model(model, ["stem_relu", "pool", "b2_out"])
    assert [m.name for m in modules] == [f"stage{j}_module" for j in range(1, 5)]
    spans = [layer_span(m) for m in modules]
    assert spans[:2] == [("stem_conv", "stem_relu", 3), ("b1_conv", "pool", 5)]
    assert spans[2][1:] == ("b2_out", 6) and spans[2][0] in ("b2_conv", "b2_proj")
    assert spans[3] == ("avg_pool", "predictions", 2)
    assert [tuple(m.outputs[0].shape[1:]) for m in modules] == [
        (12, 12, 8), (6, 6, 8), (6, 6, 16), (5,)]
    got = compose(modules, x).numpy()
    assert np.array_equal(got, expected)
    # BN ran on the moving statistics: with fresh ones the answer differs.
    assert not np.array_equal(expected, residual_model(classes=5)(x, training=False))
    assert_shares_weights(model, modules)

    # A change to the model's weights is a change to the modules' (shared objects).
    kernel = model.get_layer("b2_proj").kernel
    kernel.assign(kernel * 2.0)
    assert np.array_equal(compose(modules, x).numpy(), model(x, training=False).numpy())
    assert not np.array_equal(compose(modules, x).numpy(), got)


def test_resnet20_in_three_balanced_modules_is_the_model_bit_for_bit():
    model = resnets.resnet("cifar", 20, (32, 32, 3), classes=10)
    randomise_batch_norm(model, seed=1)
    trunk, top = trunk_and_top(model)
    at = balanced_split_points(trunk, 3)
    # 19 convs: conv1 + 3 groups of 3 blocks of 2; 7 / 6 / 6.
    assert at == ["conv2_block3_out", "conv3_block3_out"]
    modules = split_model(trunk, at)
    assert [sum(isinstance(l, keras.layers.Conv2D) for l in m.layers) for m in modules] \
        == [7, 6, 6]
    assert [tuple(m.outputs[0].shape[1:]) for m in modules] == [
        (32, 32, 16), (16, 16, 32), (8, 8, 64)]

    x = tf.random.stateless_uniform([3, 32, 32, 3], seed=[3, 4], minval=-2, maxval=2)
    expected = model(x, training=False).numpy()
    assert np.array_equal(top(compose(modules, x), training=False).numpy(), expected)
    assert np.array_equal(compose(modules, x).numpy(), trunk(x, training=False).numpy())
    assert_shares_weights(model, [*modules, top])
    assert (sum(count(m.trainable_weights) for m in [*modules, top])
            == 269_722)  # ResNet-20 with its classifier


# -------------------------------------------------------------- refusals ----

def test_a_split_point_spanned_by_a_skip_connection_names_layer_and_connection():
    model = residual_model()
    with pytest.raises(SplitError) as info:
        split_model(model, ["b1_conv"], key="model.split_at")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.split_at[0]: layer 'b1_conv' is not a split point")
    # The connection: b1_add reads stem_relu, which comes before b1_conv.
    assert "'b1_add' reads 'stem_relu'" in message
    assert "skip connection" in message
    assert isinstance(info.value, KgreedyError)  # -> exit status 2 in the front ends
    # Inside the projection block: the shortcut's branch spans the main path's BN.
    with pytest.raises(SplitError, match=r"split_at\[1\]: layer 'b2_bn' is not a split "
                                         r"point: '\w+' reads '\w+'"):
        split_model(model, ["pool", "b2_bn"])


def test_split_points_out_of_order_unknown_or_repeated_are_refused():
    model = residual_model()
    with pytest.raises(SplitError, match=r"^split_at\[1\]: 'stem_relu' comes before "
                                         r"'pool' in the model; list the split points"):
        split_model(model, ["pool", "stem_relu"])
    with pytest.raises(SplitError, match=r"^split_at\[1\]: no layer of that name in model "
                                         r"'tiny_residual' \(its layers: .*received "
                                         r"'conv9'"):
        split_model(model, ["pool", "conv9"])
    with pytest.raises(SplitError, match=r"^split_at: names a layer twice"):
        split_model(model, ["pool", "pool"])
    with pytest.raises(SplitError, match=r"'b2_out' is the model's last layer"):
        split_model(model, ["b2_out"])


def test_a_layer_used_twice_is_no_split_point():
    inputs = keras.Input((8, 8, 2))
    shared = keras.layers.Conv2D(2, 3, padding="same", name="shared")
    x = keras.layers.ReLU(name="relu1")(shared(inputs))
    x = keras.layers.ReLU(name="relu2")(shared(x))
    model = keras.Model(inputs, x, name="twice")
    assert split_points(model) == ["relu1"]
    with pytest.raises(SplitError, match=r"^split_at\[0\]: layer 'shared' is used 2 times "
                                         r"in the model; a split point must be used once"):
        split_model(model, ["shared"])
    # Between its two uses it is fine: both modules run the one layer.
    first, second = split_model(model, ["relu1"])
    assert first.get_layer("shared") is second.get_layer("shared")
    x = tf.random.stateless_normal([2, 8, 8, 2], seed=[5, 6])
    assert np.array_equal(second(first(x)).numpy(), model(x).numpy())


def test_multi_input_multi_output_and_subclassed_models_are_refused():
    a, b = keras.Input((8, 8, 1), name="a"), keras.Input((8, 8, 1), name="b")
    x = keras.layers.Conv2D(2, 3, name="ca")(a)
    y = keras.layers.Conv2D(2, 3, name="cb")(b)
    two_inputs = keras.Model([a, b], keras.layers.Add(name="add")([x, y]), name="two")
    with pytest.raises(SplitError, match=r"^split_at: model 'two' has 2 inputs and 1 "
                                         r"outputs; kgreedy splits a chain"):
        split_model(two_inputs, ["ca"])
    two_outputs = keras.Model(a, [x, keras.layers.ReLU(name="r")(x)], name="fork")
    with pytest.raises(SplitError, match=r"'fork' has 1 inputs and 2 outputs"):
        split_points(two_outputs)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="subclassed")
            self.conv = keras.layers.Conv2D(2, 3, name="conv")

        def call(self, inputs):
            return self.conv(inputs)

    model = Subclassed()
    model(tf.zeros([1, 8, 8, 1]))
    with pytest.raises(SplitError, match=r"^split_at: model 'subclassed' is not a "
                                         r"functional or built Sequential model"):
        split_model(model, ["conv"])
    with pytest.raises(SplitError, match="expected a Keras model"):
        split_points(keras.layers.Conv2D(2, 3))


def test_sequential_models_split_fine():
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", name="c1"),
        keras.layers.BatchNormalization(name="bn1"),
        keras.layers.ReLU(name="r1"),
        keras.layers.Conv2D(6, 3, strides=2, padding="same", name="c2"),
        keras.layers.ReLU(name="r2"),
        keras.layers.Conv2D(6, 3, padding="same", name="c3"),
    ], name="seq")
    randomise_batch_norm(model, seed=2)
    assert split_points(model) == ["c1", "bn1", "r1", "c2", "r2"]
    modules = split_model(model, ["r1", "r2"], name_format="piece{}")
    assert [m.name for m in modules] == ["piece1", "piece2", "piece3"]
    assert [layer_span(m) for m in modules] == [("c1", "r1", 3), ("c2", "r2", 2),
                                                ("c3", "c3", 1)]
    x = tf.random.stateless_normal([2, 8, 8, 3], seed=[7, 8])
    assert np.array_equal(compose(modules, x).numpy(), model(x, training=False).numpy())
    assert_shares_weights(model, modules)
    # Splitting only where the answer is a feature map.
    dense = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(4, name="d1"),
                              keras.layers.Dense(2, name="d2")])
    with pytest.raises(SplitError, match=r"'d1' outputs shape \(None, 4\), not a "
                                         r"feature map"):
        split_model(dense, ["d1"])


# ---------------------------------------------------------- balanced cuts ----

def convs(module):
    return sum(isinstance(l, keras.layers.Conv2D) for l in module.layers)


def test_resnet32_in_four_modules_of_7_8_8_8_convs_and_memory_cuts_earlier():
    trunk = resnets.cifar_resnet(32, (32, 32, 3))
    assert convs(trunk) == 31
    by_layers = balanced_split_points(trunk, 4)
    assert by_layers == ["conv2_block3_out", "conv3_block2_out", "conv4_block1_out"]
    assert [convs(m) for m in split_model(trunk, by_layers)] == [7, 8, 8, 8]

    by_memory = balanced_split_points(trunk, 4, balance="memory")
    assert by_memory != by_layers
    # The first group's 32x32x16 maps are the largest: memory cuts there sooner.
    order = [layer.name for layer in trunk.layers]
    assert order.index(by_memory[0]) < order.index(by_layers[0])
    assert all(name.endswith("_out") for name in by_memory)
    memory_modules = split_model(trunk, by_memory)
    assert sum(convs(m) for m in memory_modules) == 31
    assert convs(memory_modules[0]) < 7

    assert balanced_split_points(trunk, 1) == []


def test_more_modules_than_split_points_is_an_error():
    model = residual_model()
    with pytest.raises(SplitError, match=r"^model\.modules: model 'tiny_residual' has "
                                         r"\d+ (split points|places to split).*at most \d+ "
                                         r"modules; received 20"):
        balanced_split_points(model, 20)
    # Of split points in a row (conv, BN, ReLU; add, ReLU) only the last is a place
    # to cut: stem_relu and pool. b2_add is a split point, but a cut there would
    # leave the last module only the ReLU b2_out, without a weight.
    assert split_points(model)[-1] == "b2_add"
    assert balanced_split_points(model, 3) == ["stem_relu", "pool"]
    with pytest.raises(SplitError, match=r"has 2 places to split between its layers, so "
                                         r"at most 3 modules; received 4"):
        balanced_split_points(model, 4)
    # ResNet-20: after conv1 and after each of its 9 blocks but the last.
    trunk = resnets.cifar_resnet(20, (32, 32, 3))
    at = balanced_split_points(trunk, 10)
    assert at == ["conv1_relu"] + [f"conv{g}_block{b}_out" for g in (2, 3, 4)
                                   for b in (1, 2, 3)][:-1]
    assert all(convs(m) == 2 for m in split_model(trunk, at)[1:])
    with pytest.raises(SplitError, match=r"'resnet20' has 9 places to split between its "
                                         r"layers, so at most 10 modules; received 11"):
        balanced_split_points(trunk, 11)


# ------------------------------------------------------------ trunk, top ----

def test_trunk_and_top_of_a_model_with_its_own_classifier():
    model = residual_model(classes=5)
    randomise_batch_norm(model, seed=3)
    trunk, top = trunk_and_top(model)
    assert trunk.name == "tiny_residual" and top.name == "tiny_residual_top"
    assert trunk.layers[-1].name == "b2_out"
    assert tuple(trunk.outputs[0].shape[1:]) == (6, 6, 16)
    assert [l.name for l in top.layers[1:]] == ["avg_pool", "predictions"]
    x = tf.random.stateless_normal([2, 12, 12, 3], seed=[9, 10])
    assert np.array_equal(top(trunk(x, training=False)).numpy(),
                          model(x, training=False).numpy())
    assert_shares_weights(model, [trunk, top])
    assert top.count_params() == 16 * 5 + 5

    # A model that ends in a feature map is all trunk.
    bare = residual_model()
    assert trunk_and_top(bare) == (bare, None)

    # A classifier with no feature map that all paths pass: nothing to split.
    inputs = keras.Input((8, 8, 1))
    flat = keras.layers.Flatten(name="flat")(inputs)
    mlp = keras.Model(inputs, keras.layers.Dense(3, name="out")(flat), name="mlp")
    with pytest.raises(SplitError, match=r"^model: model 'mlp' outputs shape \(None, 3\) "
                                         r"and has no feature-map layer"):
        trunk_and_top(mlp)

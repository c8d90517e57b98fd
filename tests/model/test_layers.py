"""Layers and heads: psi, blocks, auxiliary heads, names and configs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy.config.designs import head_widths
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.head_layers import AuxHead
from kgreedy.model.layers import ConvBlock, InvertibleDownsampling, Standardize


def test_psi_is_exactly_invertible():
    x = tf.random.normal([3, 8, 6, 5], seed=1)
    psi = InvertibleDownsampling(2)
    y = psi(x)
    assert y.shape == (3, 4, 3, 20)
    np.testing.assert_array_equal(psi.inverse(y).numpy(), x.numpy())


def test_psi_matches_pytorch_layout():
    # The official code's psi moves each 2x2 patch into channels, patch position
    # major and channel minor in NHWC: out[..., (2*di + dj) * C + c] = x[2i+di, 2j+dj, c].
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    y = InvertibleDownsampling(2)(x).numpy()
    for di in range(2):
        for dj in range(2):
            for c in range(3):
                np.testing.assert_array_equal(y[:, :, :, (2 * di + dj) * 3 + c],
                                              x[:, di::2, dj::2, c])


@pytest.mark.parametrize("downsample,shape", [
    ("none", (2, 8, 8, 6)), ("psi", (2, 4, 4, 6)), ("maxpool", (2, 4, 4, 6)),
    ("avgpool", (2, 4, 4, 6)), ("stride", (2, 4, 4, 6))])
def test_block_downsampling_shapes(downsample, shape):
    block = ConvBlock(6, downsample, batch_norm=True)
    assert tuple(block(tf.zeros([2, 8, 8, 3])).shape) == shape
    assert block.compute_output_shape((2, 8, 8, 3)) == shape


def test_block_without_batch_norm_has_bias_and_no_bn():
    block = ConvBlock(4, "none", batch_norm=False)
    block(tf.zeros([1, 4, 4, 2]))
    assert sorted(w.path.split("/", 1)[1] for w in block.weights) == ["conv/bias",
                                                                      "conv/kernel"]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("size", [8, 32])
def test_head_output_shapes(k, size):
    head = AuxHead(num_classes=7, k=k, width=16, pool_size=2, batch_norm=True)
    out = head(tf.random.normal([4, size, size, 12]), training=False)
    assert tuple(out.shape) == (4, 7)
    assert len(head.convs) == k - 1
    # pool to 2x2 then dense: 2*2*channels inputs (block's 12 channels when k=1).
    channels = 12 if k == 1 else 16
    assert head.dense.kernel.shape == (2 * 2 * channels, 7)


def test_head_pools_odd_maps_adaptively():
    head = AuxHead(num_classes=3, k=1, width=4, batch_norm=False)
    assert tuple(head(tf.zeros([2, 7, 7, 5])).shape) == (2, 3)


@pytest.mark.parametrize("layer", [
    InvertibleDownsampling(2, name="psi_x"),
    ConvBlock(8, "psi", batch_norm=False, name="stage3_block"),
    AuxHead(num_classes=10, k=3, width=32, pool_size=2, batch_norm=True, name="stage3_head"),
    Standardize([1.0, 2.0], [3.0, 4.0], name="standardize"),
], ids=lambda layer: type(layer).__name__)
def test_get_config_round_trips(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert restored.get_config() == config


def _recipe(**model):
    return recipe_from_dict({"name": "t", "aux": {"k": 2, "width": 4},
                             "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"},
                                                  {"width": 8, "downsample": "maxpool"}],
                                       **model}})


def test_layer_and_weight_names_say_stage_and_role():
    net = from_recipe(_recipe(), (8, 8, 1), 10, [0.0], [1.0])
    assert [b.name for b in net.modules] == ["stage1_block", "stage2_block", "stage3_block"]
    assert [h.name for h in net.heads] == ["stage1_head", "stage2_head", "stage3_head"]
    paths = {w.path for w in net.modules[1].weights + net.heads[1].weights}
    assert "stage2_block/conv/kernel" in paths
    assert "stage2_head/dense/kernel" in paths
    assert "stage2_head/conv1/conv/kernel" in paths
    model = net.deployed_model(2)
    assert [layer.name for layer in model.layers][1:] == [
        "standardize", "stage1_block", "stage2_block", "stage2_head"]


def test_head_width_doubles_at_each_downsampling():
    assert head_widths(_recipe()) == [4, 8, 16]
    flat = recipe_from_dict({**_recipe().to_dict(), "aux": {"k": 2, "width": 4,
                                                            "grow_with_downsample": False}})
    assert head_widths(flat) == [4, 4, 4]


def test_standardize_normalises_per_channel():
    layer = Standardize([1.0, 10.0], [2.0, 5.0])
    x = np.array([[[[3.0, 20.0]]]], np.float32)
    np.testing.assert_allclose(layer(x).numpy(), [[[[1.0, 2.0]]]])

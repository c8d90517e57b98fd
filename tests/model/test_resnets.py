"""The named residual networks (`kgreedy.model.resnets`): parameter counts (He et al.'s
CIFAR ResNets, torchvision's ImageNet ones), stage shapes, keras.applications layer
names, and the option A shortcut.

Counts do not depend on the input size, so the ImageNet networks are built at 64x64.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy.model import resnets
from kgreedy.model.resnets import ZeroPadShortcut


def trainable(model):
    """Trainable parameters: BN's gamma and beta count, its moving statistics do not
    (as torchvision's buffers)."""
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def conv_bn(cin, cout, size):
    return size * size * cin * cout + 2 * cout  # no conv bias before BN


def cifar_count(depth, classes=10):
    """He et al. section 4.2 by hand: conv3x3(16), 3 groups of n basic blocks of
    16/32/64 channels, parameter-free (option A) shortcuts, pool + linear."""
    n = (depth - 2) // 6
    total, cin = conv_bn(3, 16, 3), 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv_bn(cin, width, 3) + conv_bn(width, width, 3)
            cin = width
    return total + 64 * classes + classes


def imagenet_count(depth, classes=1000):
    """torchvision's ResNet-18/34/50 by hand: conv7x7(64), 4 groups, projection
    shortcuts (conv1x1 + BN) where the shape changes, pool + linear."""
    kind, counts = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                    50: ("bottleneck", (3, 4, 6, 3))}[depth]
    total, cin = conv_bn(3, 64, 7), 64
    for width, count in zip((64, 128, 256, 512), counts):
        out = width if kind == "basic" else 4 * width
        for b in range(count):
            if kind == "basic":
                total += conv_bn(cin, width, 3) + conv_bn(width, width, 3)
            else:
                total += (conv_bn(cin, width, 1) + conv_bn(width, width, 3)
                          + conv_bn(width, out, 1))
            if b == 0 and (cin != out or width != 64):
                total += conv_bn(cin, out, 1)
            cin = out
    return total + cin * classes + classes


@pytest.mark.parametrize("depth,count", [(20, 269_722), (32, 464_154), (56, 853_018),
                                         (110, 1_727_962)])
def test_cifar_resnet_parameter_counts(depth, count):
    assert cifar_count(depth) == count  # the arithmetic, against the published size
    model = resnets.resnet("cifar", depth, (32, 32, 3), classes=10)
    assert trainable(model) == count
    # No shortcut has weights: the trunk is every conv and BN, the top pool + linear.
    assert trainable(model.get_layer("predictions")) == 64 * 10 + 10
    assert not any(layer.weights for layer in model.layers
                   if isinstance(layer, ZeroPadShortcut))


@pytest.mark.parametrize("depth,count", [(18, 11_689_512), (34, 21_797_672),
                                         (50, 25_557_032)])
def test_imagenet_resnet_parameter_counts_are_torchvisions(depth, count):
    assert imagenet_count(depth) == count
    model = resnets.resnet("imagenet", depth, (64, 64, 3), classes=1000)
    assert trainable(model) == count
    assert model.layers[-1].name == "predictions"
    assert model.layers[-2].name == "avg_pool"


def block_outputs(model):
    return {layer.name: tuple(layer.output.shape[1:]) for layer in model.layers
            if layer.name.endswith("_out") or layer.name in ("conv1_relu", "pool1_pool")}


def test_cifar_resnet20_stage_shapes_and_names():
    model = resnets.cifar_resnet(20, (32, 32, 3))
    assert model.name == "resnet20"
    assert model.inputs[0].shape[1:] == (32, 32, 3)
    shapes = block_outputs(model)
    assert shapes["conv1_relu"] == (32, 32, 16)
    for b in (1, 2, 3):
        assert shapes[f"conv2_block{b}_out"] == (32, 32, 16)
        assert shapes[f"conv3_block{b}_out"] == (16, 16, 32)
        assert shapes[f"conv4_block{b}_out"] == (8, 8, 64)
    assert len(shapes) == 10
    assert model.layers[-1].name == "conv4_block3_out"  # the trunk ends at a block
    # Option A where the shape changes, identity elsewhere.
    pads = [l.name for l in model.layers if isinstance(l, ZeroPadShortcut)]
    assert pads == ["conv3_block1_0_pad", "conv4_block1_0_pad"]
    # Any 6n+2 works; other depths do not.
    assert resnets.cifar_resnet(8, (16, 16, 3)).layers[-1].name == "conv4_block1_out"
    with pytest.raises(ValueError, match=r"6n\+2.*Received: depth=21"):
        resnets.cifar_resnet(21, (32, 32, 3))


def test_imagenet_resnet18_stage_shapes():
    model = resnets.imagenet_resnet(18, (64, 64, 3))
    shapes = block_outputs(model)
    assert shapes["conv1_relu"] == (32, 32, 64)
    assert shapes["pool1_pool"] == (16, 16, 64)
    assert [shapes[f"conv{g}_block{b}_out"] for g in (2, 3, 4, 5) for b in (1, 2)] == [
        (16, 16, 64)] * 2 + [(8, 8, 128)] * 2 + [(4, 4, 256)] * 2 + [(2, 2, 512)] * 2
    assert len(shapes) == 10
    assert model.layers[-1].name == "conv5_block2_out"
    # Projection shortcuts where the shape changes (groups 3-5), identity elsewhere.
    assert sorted(l.name for l in model.layers if l.name.endswith("_0_conv")) == [
        "conv3_block1_0_conv", "conv4_block1_0_conv", "conv5_block1_0_conv"]
    with pytest.raises(ValueError, match=r"18, 34, 50.*Received: depth=101"):
        resnets.imagenet_resnet(101, (64, 64, 3))


def test_resnet50_block_outputs_are_named_as_keras_applications():
    ours = resnets.imagenet_resnet(50, (64, 64, 3))
    theirs = keras.applications.ResNet50(weights=None, include_top=False,
                                         input_shape=(64, 64, 3))
    names = {l.name for l in theirs.layers if l.name.endswith(("_out", "_add"))}
    assert names == {l.name for l in ours.layers if l.name.endswith(("_out", "_add"))}
    for name in names:
        assert ours.get_layer(name).output.shape == theirs.get_layer(name).output.shape
    shapes = block_outputs(ours)
    assert shapes["conv1_relu"] == (32, 32, 64) and shapes["pool1_pool"] == (16, 16, 64)
    assert [shapes[f"conv{g}_block1_out"] for g in (2, 3, 4, 5)] == [
        (16, 16, 256), (8, 8, 512), (4, 4, 1024), (2, 2, 2048)]
    assert ours.layers[-1].name == "conv5_block3_out"


def test_zero_pad_shortcut_subsamples_pads_evenly_and_round_trips():
    x = tf.reshape(tf.range(2 * 4 * 4 * 3, dtype=tf.float32), [2, 4, 4, 3])
    layer = ZeroPadShortcut(2, 8, name="pad")
    y = layer(x).numpy()
    assert y.shape == (2, 2, 2, 8)
    assert tuple(layer.compute_output_shape((None, 5, 4, 3))) == (None, 3, 2, 8)
    # 5 extra channels: 2 before the input's, 3 after.
    assert not y[..., :2].any() and not y[..., 5:].any()
    np.testing.assert_array_equal(y[..., 2:5], x.numpy()[:, ::2, ::2, :])
    same = ZeroPadShortcut(1, 3)(x).numpy()
    np.testing.assert_array_equal(same, x.numpy())

    config = layer.get_config()
    assert config["stride"] == 2 and config["channels"] == 8 and config["name"] == "pad"
    again = ZeroPadShortcut.from_config(config)
    assert again.get_config() == config
    np.testing.assert_array_equal(again(x).numpy(), y)
    # Registered: Keras' own (de)serialisation finds it by name.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, ZeroPadShortcut) and restored.get_config() == config


def test_a_saved_cifar_resnet_loads_in_safe_mode_with_the_same_outputs(tmp_path):
    model = resnets.resnet("cifar", 8, (16, 16, 3), classes=4)
    path = str(tmp_path / "resnet8.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    assert [l.name for l in loaded.layers] == [l.name for l in model.layers]
    x = tf.random.stateless_normal([2, 16, 16, 3], seed=[1, 1])
    np.testing.assert_array_equal(loaded(x, training=False).numpy(),
                                  model(x, training=False).numpy())


# InfoPro's split points for ResNet-32 (Experiments on CIFAR-SVHN-STL10/networks/
# configs.py of its official code): [stage, block], both 0-based, module ends after
# that block. Stage s is Keras' conv{s+1}, block b its block{b+1}.
INFOPRO_RESNET32 = {4: [[1, 2], [2, 1], [3, 0]],
                    8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]]}


@pytest.mark.parametrize("modules", [4, 8])
def test_resnet32_balanced_modules_end_where_infopro_splits(modules):
    from kgreedy.model.split import balanced_split_points
    model = resnets.cifar_resnet(32, (32, 32, 3))
    points = balanced_split_points(model, modules)
    assert [getattr(p, "name", p) for p in points] == [
        f"conv{s + 1}_block{b + 1}_out" for s, b in INFOPRO_RESNET32[modules]]

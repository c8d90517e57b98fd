"""Auxiliary head types (conv, mlp_sr, linear), aux.head and aux.per_stage."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy.base.errors import RecipeError
from kgreedy.config.designs import HeadDesign, head_designs, head_widths
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.config.vocabulary import HEAD_TYPES
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.head_layers import (HEADS, AuxHead, LinearHead, MlpSrHead, VggHead,
                                      make_head)


def _recipe(aux):
    return recipe_from_dict({
        "name": "t", "aux": {"k": 2, "width": 4, **aux},
        "model": {"blocks": [{"width": 4}, {"width": 8, "downsample": "psi"},
                             {"width": 8, "downsample": "psi"}]}})


def test_every_recipe_head_type_has_a_layer():
    assert set(HEADS) == set(HEAD_TYPES) == {"conv", "mlp_sr", "linear", "vgg"}
    assert _recipe({}).aux.head == "conv"  # the paper's head stays the default


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("size", [4, 8, 32])
def test_mlp_sr_shapes(k, size):
    head = MlpSrHead(num_classes=7, k=k, width=16, pool_size=2, batch_norm=True)
    out = head(tf.random.normal([3, size, size, 12]), training=True)
    assert tuple(out.shape) == (3, 7)
    # Reduced to ceil(side/4), never below the pool nor above the input.
    assert head.reduced_side(size) == {4: 2, 8: 2, 32: 8}[size]
    channels = 12 if k == 1 else 16
    assert head.mlp1.kernel.shape == (2 * 2 * channels, 4 * 16)
    assert head.dense.kernel.shape == (4 * 16, 7)
    convs = [w for w in head.weights if "conv" in w.path and w.path.endswith("kernel")]
    assert [tuple(w.shape[:2]) for w in convs] == [(1, 1)] * (k - 1)


def test_linear_head_is_pool_and_one_dense_layer():
    head = LinearHead(num_classes=5, pool_size=2)
    assert tuple(head(tf.zeros([2, 8, 8, 3])).shape) == (2, 5)
    assert sorted(w.path.split("/", 1)[1] for w in head.weights) == ["dense/bias",
                                                                     "dense/kernel"]
    assert head.dense.kernel.shape == (2 * 2 * 3, 5)


@pytest.mark.parametrize("layer", [
    MlpSrHead(num_classes=10, k=3, width=8, pool_size=4, mlp_layers=2, reduction=2,
              batch_norm=False, name="stage2_head"),
    LinearHead(num_classes=10, pool_size=1, name="stage1_head"),
], ids=lambda layer: type(layer).__name__)
def test_get_config_round_trips(layer):
    config = layer.get_config()
    for key in ("num_classes", "pool_size"):
        assert key in config
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert restored.get_config() == config


def test_make_head_builds_from_the_fields_its_kind_uses():
    # A recipe's linear design keeps aux.k and aux.width; the linear head uses neither.
    head = make_head(HeadDesign("linear", k=2, width=64, pool_size=2), 3, batch_norm=True,
                     sync_batch_norm=False, name="stage1_head")
    assert isinstance(head, LinearHead) and head.name == "stage1_head"
    assert head.pool_size == 2
    mlp = make_head(HeadDesign("mlp_sr", k=2, width="auto", pool_size=2), 3, channels=6)
    assert isinstance(mlp, MlpSrHead) and (mlp.width, mlp.reduction) == (6, 4)
    conv = make_head(HeadDesign("conv", k=3, width=4, pool_size=1, reduction=2), 3,
                     batch_norm=False)
    assert (type(conv), conv.k, conv.width, conv.reduction, conv.bn) == (AuxHead, 3, 4, 2,
                                                                         None)
    assert make_head(HeadDesign("conv", k=2, width=4, pool_size=1), 3).reduction == 1
    with pytest.raises(ValueError, match=r"pass `channels`.*Received: width='auto'"):
        make_head(HeadDesign("conv", k=2, width="auto", pool_size=2), 3)
    with pytest.raises(ValueError, match=r"own classifier.*Received: kind='model'"):
        make_head(HeadDesign("model"), 3)
    with pytest.raises(ValueError, match=r"HeadDesign. Received: design='conv'"):
        make_head("conv", 3)


@pytest.mark.parametrize("fields, message", [
    ({"kind": "mlp"}, r"`kind` must be one of \('conv', .*Received: kind='mlp'"),
    ({"kind": "conv", "width": 8, "pool_size": 2}, r"`k` must be a positive integer. "
                                                   r"Received: k=None"),
    ({"kind": "conv", "k": True, "width": 8, "pool_size": 2}, r"Received: k=True"),
    ({"kind": "mlp_sr", "k": 2, "width": "wide", "pool_size": 2},
     r"'auto' \(the module's output channels\). Received: width='wide'"),
    ({"kind": "conv", "k": 2, "width": 8, "pool_size": 2, "reduction": 0},
     r"positive integer or None. Received: reduction=0"),
    ({"kind": "linear"}, r"Received: pool_size=None"),
    ({"kind": "linear", "pool_size": 2, "k": 0}, r"or None. Received: k=0"),
])
def test_a_head_design_checks_itself(fields, message):
    with pytest.raises(ValueError, match=message):
        HeadDesign(**fields)


def test_head_designs_are_frozen_and_compare_by_value():
    design = HeadDesign("vgg")
    assert design == HeadDesign("vgg") and not design.pools
    assert HeadDesign("linear", pool_size=3).pools
    with pytest.raises(dataclasses.FrozenInstanceError):
        design.kind = "conv"


@pytest.mark.parametrize("kind", sorted(set(HEAD_TYPES) - {"vgg"}))  # vgg has no pool_size
def test_pool_size_one_trains_in_a_traced_step(kind):
    # Keras 3.15's AdaptiveAveragePooling2D(1) fails inside tf.function.
    head = make_head(HeadDesign(kind, k=2, width=4, pool_size=1), 4)
    head.build((None, 8, 8, 3))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(head(x, training=True))
        return tape.gradient(loss, head.trainable_weights)

    grads = step(tf.random.normal([2, 8, 8, 3]))
    assert all(g is not None for g in grads)
    x = tf.random.normal([2, 8, 8, 3])
    np.testing.assert_allclose(
        head.pool(x).numpy(), tf.reduce_mean(x, axis=[1, 2], keepdims=True).numpy(),
        rtol=1e-6)


def test_conv_head_checkpoint_layout_is_unchanged():
    head = AuxHead(num_classes=10, k=3, width=8, pool_size=1, name="stage2_head")
    head.build((None, 8, 8, 4))
    assert sorted(w.path for w in head.weights) == sorted(
        [f"stage2_head/conv{i}/{p}" for i in (1, 2) for p in (
            "conv/kernel", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance")]
        + [f"stage2_head/bn/{p}" for p in ("gamma", "beta", "moving_mean",
                                            "moving_variance")]
        + ["stage2_head/dense/kernel", "stage2_head/dense/bias"])


def test_net_uses_aux_head_for_every_stage():
    net = from_recipe(_recipe({"head": "mlp_sr"}), (8, 8, 1), 10, [0.0], [1.0])
    assert [type(h) for h in net.heads] == [MlpSrHead] * 3
    assert [h.width for h in net.heads] == [4, 8, 16]
    assert tuple(net.deployed_model(3)(tf.zeros([2, 8, 8, 1])).shape) == (2, 10)


def test_per_stage_overrides_the_aux_keys_for_their_stage():
    recipe = _recipe({"pool_size": 2, "per_stage": [
        {"head": "linear", "pool_size": 4}, {"width": 5}, {}]})
    assert head_widths(recipe) == [4, 5, 16]  # given as is; the others still doubled
    assert head_designs(recipe) == [HeadDesign("linear", 2, 4, 4), HeadDesign("conv", 2, 5, 2),
                                    HeadDesign("conv", 2, 16, 2)]
    last = _recipe({"last_head": "vgg", "last_width": 32, "reduction": 2})
    assert head_designs(last)[1:] == [HeadDesign("conv", 2, 8, 2, 2),
                                      HeadDesign("vgg", 2, 32, 2, 2)]
    net = from_recipe(recipe, (8, 8, 1), 10, [0.0], [1.0])
    assert [type(h) for h in net.heads] == [LinearHead, AuxHead, AuxHead]
    assert net.heads[0].pool_size == 4 and net.heads[1].width == 5
    assert recipe_from_dict(recipe.to_dict()) == recipe
    # Too many entries: refused when the recipe loads, before anything is built.
    with pytest.raises(RecipeError, match=r"aux.per_stage: has more entries than the 3 "
                                          r"stages of the model; received 4"):
        _recipe({"per_stage": [{}] * 4})


@pytest.mark.parametrize("aux,path", [
    ({"head": "mlp"}, "aux.head"),
    ({"per_stage": [{"head": "dgl"}]}, r"aux.per_stage\[0\].head"),
    ({"per_stage": [{}, {"k": 0}]}, r"aux.per_stage\[1\].k"),
    ({"per_stage": [{"depth": 2}]}, r"aux.per_stage\[0\].depth: unknown key"),
    ({"per_stage": {"k": 1}}, "aux.per_stage: expected a list"),
])
def test_bad_head_keys_name_the_key(aux, path):
    with pytest.raises(RecipeError, match=path):
        _recipe(aux)


def test_mlp_sr_and_linear_heads_restore_from_a_checkpoint(tmp_path):
    recipe = _recipe({"per_stage": [{"head": "mlp_sr"}, {"head": "linear"}]})
    net = from_recipe(recipe, (8, 8, 1), 10, [0.0], [1.0])
    for w in net.heads[0].weights + net.heads[1].weights:
        w.assign(tf.random.normal(w.shape))
    path = tf.train.Checkpoint(heads=net.heads).save(str(tmp_path / "ckpt"))
    fresh = from_recipe(recipe, (8, 8, 1), 10, [0.0], [1.0])
    tf.train.Checkpoint(heads=fresh.heads).restore(path).assert_existing_objects_matched()
    for a, b in zip(net.heads[0].weights + net.heads[1].weights,
                    fresh.heads[0].weights + fresh.heads[1].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_vgg_head_trains_with_dropout_and_round_trips():
    head = VggHead(num_classes=3, units=16, name="stage8_head")
    head.build((None, 4, 4, 5))
    assert head.fc1.kernel.shape == (2 * 2 * 5, 16)
    x = tf.random.normal([6, 4, 4, 5])
    # Dropout acts in training only: inference is deterministic, training is not.
    np.testing.assert_array_equal(head(x, training=False), head(x, training=False))
    assert not np.allclose(head(x, training=True), head(x, training=True))
    clone = type(head).from_config(head.get_config())
    assert clone.get_config() == head.get_config()


def test_conv_head_reduction_pools_before_its_convs():
    head = AuxHead(num_classes=3, k=3, width=4, pool_size=2, reduction=2)
    head.build((None, 16, 16, 5))
    assert head.reduce is not None
    x = tf.random.normal([2, 16, 16, 5])
    assert tuple(head.reduce(x).shape) == (2, 8, 8, 5)
    assert tuple(head(x).shape) == (2, 3)
    assert AuxHead.from_config(head.get_config()).reduction == 2
    plain = AuxHead(num_classes=3, k=3, width=4)
    plain.build((None, 16, 16, 5))
    assert plain.reduce is None

"""InfoPro's parts and objectives (kgreedy.model.objective_parts,
kgreedy.model.objectives): the losses against arithmetic done by hand, the layers'
shapes, ranges and configs, bfloat16, the weights."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgreedy.config.vocabulary import LOCAL_OBJECTIVES
from kgreedy.model.objective_parts import (LossWeights, ProjectionHead,
                                           ReconstructionDecoder, reconstruction_loss,
                                           supervised_contrastive_loss)
from kgreedy.model.objectives import (FIRST_WEIGHTS, INFOPRO_RESNET32_CIFAR10,
                                      LAST_WEIGHTS, OBJECTIVES, CrossEntropy, InfoPro,
                                      InfoProContrast, make_objective, module_weights)

T = 0.07


def _unit(angle):
    return [math.cos(angle), math.sin(angle)]


def _by_hand(z, labels, t=T):
    """L_out of Khosla et al. 2020 (eq. 2), one anchor at a time, in float64."""
    out = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = sum(math.exp(np.dot(z[i], z[a]) / t) for a in others)
        positives = [p for p in others if labels[p] == labels[i]]
        out.append(-sum(math.log(math.exp(np.dot(z[i], z[p]) / t) / denominator)
                        for p in positives) / len(positives))
    return out


def test_contrastive_loss_against_arithmetic_by_hand():
    # Classes 0, 0, 1, 1: anchor 0's positive (at 60 degrees) lies farther than a
    # negative (at 45 degrees), the other negative is opposite: a loss well above 0.
    z = np.array([_unit(0.0), _unit(math.pi / 3), _unit(math.pi / 4), _unit(math.pi)])
    labels = [0, 0, 1, 1]
    got = supervised_contrastive_loss(tf.constant(z, tf.float32), tf.constant(labels)).numpy()
    assert got.dtype == np.float32 and got.shape == (4,)
    # Anchor 0 written out: its positive at cos 60 = 1/2, negatives at cos 45 and cos 180.
    c, n = 0.5, math.sqrt(0.5)
    anchor0 = -math.log(math.exp(c / T) / (math.exp(c / T) + math.exp(n / T) + math.exp(-1 / T)))
    assert 2.0 < anchor0 < 4.0
    assert got[0] == pytest.approx(anchor0, rel=1e-5)
    np.testing.assert_allclose(got, _by_hand(z, labels), rtol=1e-5)


def test_two_positives_are_averaged_outside_the_log():
    z = np.array([_unit(0.0), _unit(0.3), _unit(0.6), _unit(2.0)])
    labels = [5, 5, 5, 7]  # anchor 0 has two positives; anchor 3 has none
    got = supervised_contrastive_loss(tf.constant(z, tf.float32), tf.constant(labels)).numpy()
    d = sum(math.exp(math.cos(a) / T) for a in (0.3, 0.6, 2.0))
    anchor0 = -(math.log(math.exp(math.cos(0.3) / T) / d)
                + math.log(math.exp(math.cos(0.6) / T) / d)) / 2
    # Anchor 3 is left out: 0, and the three others carry the mean (scaled by 4/3).
    assert got[3] == 0.0
    assert got[0] == pytest.approx(anchor0 * 4 / 3, rel=1e-5)


def test_an_anchor_without_positive_is_left_out_of_the_mean():
    z = np.array([_unit(0.0), _unit(0.3), _unit(0.6), _unit(2.0)])
    labels = [5, 5, 5, 7]
    got = supervised_contrastive_loss(tf.constant(z, tf.float32), tf.constant(labels)).numpy()
    # By hand for the three anchors that have positives; anchor 3 stays a negative.
    with_positive = []
    for i in range(3):
        d = sum(math.exp(np.dot(z[i], z[a]) / T) for a in range(4) if a != i)
        with_positive.append(-np.mean([math.log(math.exp(np.dot(z[i], z[p]) / T) / d)
                                       for p in range(3) if p != i]))
    assert got[3] == 0.0
    assert got.mean() == pytest.approx(np.mean(with_positive), rel=1e-5)
    # A batch of singletons has no term at all: zeros, not NaN.
    alone = supervised_contrastive_loss(tf.constant(z, tf.float32), tf.constant([0, 1, 2, 3]))
    assert np.array_equal(alone.numpy(), np.zeros(4, np.float32))


def test_coinciding_classes_lose_less_than_orthogonal_ones():
    labels = tf.constant([0, 0, 1, 1])
    together = tf.constant([_unit(0), _unit(0), _unit(math.pi / 2), _unit(math.pi / 2)])
    apart = tf.constant([_unit(0), _unit(math.pi / 2), _unit(math.pi), _unit(-math.pi / 2)])
    assert float(tf.reduce_mean(supervised_contrastive_loss(together, labels))) < \
        float(tf.reduce_mean(supervised_contrastive_loss(apart, labels)))


def test_reconstruction_loss_on_a_known_image():
    image = np.array([0.2, 0.5, 0.9, 0.7], np.float32).reshape(1, 2, 2, 1)
    itself = sum(-(x * math.log(x) + (1 - x) * math.log(1 - x))
                 for x in (0.2, 0.5, 0.9, 0.7)) / 4
    got = reconstruction_loss(image, image).numpy()
    assert got.dtype == np.float32 and got.shape == (1,)
    assert got[0] == pytest.approx(itself, rel=1e-5)
    # A grey guess of 0.5 costs log 2 per pixel whatever the image; one row per image.
    two = np.stack([image[0], 1 - image[0]])
    half = reconstruction_loss(two, np.full_like(two, 0.5)).numpy()
    np.testing.assert_allclose(half, [math.log(2)] * 2, rtol=1e-6)
    # A confident wrong pixel stays finite (the clip).
    assert np.isfinite(reconstruction_loss(np.ones_like(image), np.zeros_like(image))).all()


def test_decoder_shape_range_and_channels():
    decoder = ReconstructionDecoder((16, 12, 3))
    out = decoder(tf.random.normal([2, 4, 3, 8]) * 10, training=True)
    assert tuple(out.shape) == (2, 16, 12, 3) and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 1.0
    assert decoder.conv.kernel.shape == (3, 3, 8, 12)
    assert decoder.out.kernel.shape == (3, 3, 12, 3)
    assert ReconstructionDecoder((8, 8, 1), width=5, batch_norm=False)(
        tf.zeros([1, 2, 2, 4])).shape == (1, 8, 8, 1)


@pytest.mark.parametrize("side, strides, width", [(16, 2, 8), (8, 1, 4)])
def test_projection_head_strides_where_the_map_is_large(side, strides, width):
    # Seeded: with 6 hidden ReLU units a row may come out all zero at some random
    # initialisations (its norm is then 0), which made the test depend on the order
    # of the tests before it.
    keras.utils.set_random_seed(0)
    head = ProjectionHead(dim=6)
    out = head(tf.random.normal([3, side, side, 4]), training=True)
    assert tuple(out.shape) == (3, 6) and out.dtype == tf.float32
    np.testing.assert_allclose(tf.norm(out, axis=1).numpy(), np.ones(3), rtol=1e-5)
    assert head.conv.strides == (strides, strides)
    assert head.conv.kernel.shape == (3, 3, 4, width)  # doubled where it strides
    assert ProjectionHead(dim=6, width=5)(tf.zeros([1, 16, 16, 4])).shape == (1, 6)


LAYERS = [lambda: ReconstructionDecoder((8, 8, 3), width=7, batch_norm=False, name="d"),
          lambda: ProjectionHead(dim=16, width=5, batch_norm=False, stride_above=4),
          lambda: LossWeights(2.5, 0.5, name="w")]


@pytest.mark.parametrize("make", LAYERS)
def test_every_layer_round_trips_its_config(make):
    layer = make()
    config = layer.get_config()
    again = type(layer).from_config(config)
    assert again.get_config() == config
    serialized = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    assert serialized.get_config() == config


def test_module_weights_run_linearly_from_first_to_last():
    weights = module_weights(5, first=(4.0, 0.0), last=(0.0, 2.0))
    assert weights[0] == (4.0, 0.0) and weights[-1] == (0.0, 2.0)
    np.testing.assert_allclose(np.diff(np.array(weights), axis=0), [[-1.0, 0.5]] * 4)
    assert module_weights(1, first=(4, 0), last=(1, 2)) == ((1.0, 2.0),)
    assert module_weights(3) == ((6.0, 0.0), (3.5, 1.0), (1.0, 2.0))
    assert (FIRST_WEIGHTS, LAST_WEIGHTS) == INFOPRO_RESNET32_CIFAR10[4]
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="num_modules="):
            module_weights(bad)
    with pytest.raises(ValueError, match="first="):
        module_weights(2, first=(-1, 0))


def test_make_objective_by_name_and_its_errors():
    assert tuple(OBJECTIVES) == LOCAL_OBJECTIVES  # the recipe's choices are these
    assert isinstance(make_objective("cross_entropy"), CrossEntropy)
    objective = make_objective("infopro_contrast", first=(1, 1), last=(0, 1), dim=32)
    assert isinstance(objective, InfoProContrast) and objective.dim == 32
    assert make_objective(objective.name, **objective.get_config()) == objective
    with pytest.raises(ValueError, match=r"Received: name='infopro_contrastive'"):
        make_objective("infopro_contrastive")
    with pytest.raises(ValueError, match=r"Received: temperature=0.1"):
        make_objective("infopro", temperature=0.1)  # only the contrastive one has it
    with pytest.raises(ValueError, match="first="):
        InfoPro(first=(1, 2, 3))
    with pytest.raises(ValueError, match="stage=3"):
        InfoPro().make_parts((None, 4, 4, 8), (8, 8, 3), 10, stage=3, num_stages=2)


def _batch(channels=8):
    tf.random.set_seed(1)
    return (tf.random.normal([4, 8, 8, channels]), tf.random.uniform([4, 16, 16, 3]),
            tf.constant([0, 1, 0, 1]), tf.random.normal([4, 3]))


def test_each_objective_returns_per_example_float32_losses_and_its_total():
    features, images01, labels, logits = _batch()
    ce = CrossEntropy().losses({}, features, images01, labels, logits, training=True)
    assert set(ce) == {"cross_entropy", "total"}
    infopro = InfoPro(first=(3.0, 1.0), last=(1.0, 3.0))
    parts = infopro.make_parts((None, 8, 8, 8), (16, 16, 3), 3, stage=2, num_stages=3)
    assert set(parts) == {"decoder", "weights"} and parts["decoder"].name == "stage2_decoder"
    out = infopro.losses(parts, features, images01, labels, logits, training=True)
    # The head learns from its whole cross-entropy; w_task = 2 scales what reaches
    # the module (GreedyNet.module_losses).
    np.testing.assert_allclose(out["total"], 2.0 * out["reconstruction"]
                               + out["cross_entropy"], rtol=1e-6)
    assert infopro.head_gradient(2, 3) == 2.0 and InfoPro().head_gradient(1, 4) == 0.0
    # The deployed head's cross-entropy counts at least once in the last module.
    last_parts = InfoPro(first=(3.0, 0.0), last=(1.0, 0.0)).make_parts(
        (None, 8, 8, 8), (16, 16, 3), 3, stage=3, num_stages=3)
    assert (last_parts["weights"].w_rec, last_parts["weights"].w_task) == (1.0, 1.0)
    contrast = InfoProContrast()
    assert [contrast.head_gradient(j, 4) for j in (1, 2, 3, 4)] == [0, 0, 0, 1]
    parts = contrast.make_parts((None, 8, 8, 8), (16, 16, 3), 3, stage=1, num_stages=4)
    assert set(parts) == {"decoder", "projection", "weights"}
    assert (parts["weights"].w_rec, parts["weights"].w_task) == FIRST_WEIGHTS
    first = contrast.losses(parts, features, images01, labels, logits, training=True)
    assert set(first) == {"reconstruction", "contrastive", "cross_entropy", "total"}
    np.testing.assert_allclose(first["total"], 6.0 * first["reconstruction"]
                               + first["cross_entropy"], rtol=1e-6)
    for losses in (ce, out, first):
        for value in losses.values():
            assert value.dtype == tf.float32 and tuple(value.shape) == (4,)


@pytest.fixture
def bfloat16_policy():
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def test_the_parts_under_mixed_bfloat16(bfloat16_policy):
    features, images01, labels, _ = _batch()
    features = tf.cast(features, tf.bfloat16)
    contrast = InfoProContrast()
    parts = contrast.make_parts((None, 8, 8, 8), (16, 16, 3), 3, stage=4, num_stages=4)
    logits = tf.cast(tf.random.normal([4, 3]), tf.bfloat16)
    with tf.GradientTape() as tape:
        out = contrast.losses(parts, features, images01, labels, logits, training=True)
        total = tf.reduce_mean(out["total"])
    assert parts["decoder"].conv.compute_dtype == "bfloat16"
    for value in out.values():
        assert value.dtype == tf.float32 and np.isfinite(value.numpy()).all()
    reconstruction = parts["decoder"](features)
    assert reconstruction.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(reconstruction)) \
        <= float(tf.reduce_max(reconstruction)) <= 1.0
    embeddings = parts["projection"](features)
    np.testing.assert_allclose(tf.norm(embeddings, axis=1).numpy(), np.ones(4), rtol=1e-5)
    grads = tape.gradient(total, parts["projection"].trainable_variables)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)

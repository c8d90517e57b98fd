"""kgreedy.serving.early_exit: the module-by-module graph with early exits, on a
briefly trained 3-stage net of the digits."""

import numpy as np
import pytest
import tensorflow as tf

from kgreedy.base.errors import KgreedyError
from kgreedy.serving.early_exit import check_thresholds, confidence, early_exit_logits
from tiny_nets import trained_net

RECIPE = {"name": "t", "model": {"blocks": [{"width": 8}, {"width": 16, "downsample": "psi"},
                                            {"width": 16}]},
          "aux": {"k": 2, "width": 8}}


@pytest.fixture(scope="module")
def trained():
    _, _, net, x = trained_net(RECIPE, epochs=1)
    # Traced, as a SavedModel runs them: TensorFlow's graph optimiser fuses each conv
    # with the BN and ReLU after it, which rounds differently from eager execution.
    heads = [tf.function(lambda images, j=j: net.deployed_model(j)(images, training=False))(
        tf.constant(x)).numpy() for j in (1, 2, 3)]
    return net, x, heads


def run(net, x, thresholds, stage=None):
    """The graph as a SavedModel runs it: traced, thresholds fed as a tensor."""
    fn = tf.function(lambda images, t: early_exit_logits(net, images, t, stage))
    logits, stages = fn(tf.constant(x), tf.constant(thresholds, tf.float32))
    return logits.numpy(), stages.numpy()


def test_thresholds_of_one_give_the_last_heads_answers_bit_for_bit(trained):
    net, x, heads = trained
    logits, stages = run(net, x, [1.0, 1.0, 1.0])
    assert (stages == 3).all()
    np.testing.assert_array_equal(logits, heads[2])
    # Head 1 made overconfident: its float32 softmax maxima reach exactly 1.0, which
    # "at least 1.0" alone would let leave early.
    dense = net.heads[0].dense
    kernel = dense.kernel.numpy()
    dense.kernel.assign(kernel * 1000)
    try:
        assert (confidence(net.deployed_model(1)(x, training=False)).numpy() == 1.0).any()
        logits, stages = run(net, x, [1.0, 1.0, 1.0])
    finally:
        dense.kernel.assign(kernel)
    assert (stages == 3).all()
    np.testing.assert_array_equal(logits, heads[2])


def test_thresholds_of_zero_give_head_ones_answers(trained):
    net, x, heads = trained
    logits, stages = run(net, x, [0.0, 0.0, 0.0])
    assert (stages == 1).all()
    np.testing.assert_array_equal(logits, heads[0])


def test_a_mixed_batch_answers_each_example_with_its_exit_head(trained):
    net, x, heads = trained
    confident = [confidence(h).numpy() for h in heads]
    # Thresholds at the medians of heads 1 and 2: about half leave at head 1, and
    # of the rest some at head 2 and some at head 3.
    thresholds = [float(np.median(confident[0])), float(np.median(confident[1])), 1.0]
    logits, stages = run(net, x, thresholds)
    assert set(stages) == {1, 2, 3}, np.bincount(stages)
    expected = np.where(confident[0] >= thresholds[0], 1,
                        np.where(confident[1] >= thresholds[1], 2, 3))
    np.testing.assert_array_equal(stages, expected)
    for j in (1, 2, 3):
        mine = stages == j
        # The same class; the values to float noise (a smaller batch may take
        # another convolution kernel).
        np.testing.assert_array_equal(logits[mine].argmax(-1), heads[j - 1][mine].argmax(-1))
        np.testing.assert_allclose(logits[mine], heads[j - 1][mine], rtol=1e-4, atol=1e-4)


def test_examples_that_left_do_not_run_deeper_modules(trained):
    """Module 2 counts the examples it runs on: those that left at head 1 are not
    among them."""
    net, x, heads = trained
    module, ran = net.modules[1], tf.Variable(0, dtype=tf.int32)
    original = module.call

    def counting(inputs, *args, **kwargs):
        ran.assign_add(tf.shape(inputs)[0])
        return original(inputs, *args, **kwargs)

    module.call = counting
    try:
        threshold = float(np.median(confidence(heads[0]).numpy()))
        counts = []
        for thresholds in ([1.0, 1.0, 1.0], [threshold, 1.0, 1.0], [0.0, 1.0, 1.0]):
            ran.assign(0)
            _, stages = run(net, x, thresholds)
            counts.append((int(ran.numpy()), int((stages > 1).sum())))
    finally:
        module.call = original
    assert counts[0] == (len(x), len(x))
    assert counts[1][0] == counts[1][1] and 0 < counts[1][0] < len(x)
    assert counts[2] == (0, 0)


def test_an_empty_batch_and_a_shallower_stage(trained):
    net, x, heads = trained
    logits, stages = run(net, x[:0], [0.5, 0.5, 0.5])
    assert logits.shape == (0, 10) and stages.shape == (0,)
    logits, stages = run(net, x, [1.0, 1.0], stage=2)
    assert (stages == 2).all()
    np.testing.assert_array_equal(logits, heads[1])


@pytest.mark.parametrize("thresholds", [[0.5, 0.5], [0.5, 0.5, 1.5], [0.5, float("nan"), 1],
                                        ["a", 1, 1], [True, 1, 1], 0.5])
def test_bad_thresholds_are_refused_in_one_line(thresholds):
    with pytest.raises(KgreedyError, match="thresholds") as info:
        check_thresholds(thresholds, 3)
    assert "\n" not in str(info.value)


def test_good_thresholds_come_back_as_floats():
    assert check_thresholds([0, 0.5, 1], 3) == [0.0, 0.5, 1.0]

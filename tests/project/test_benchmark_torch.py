"""tools/benchmark_torch.py, the PyTorch reference of `tools/benchmark.py --torch`: the
same stage as kgreedy's (given the same weights: the same logits and the same two SGD
steps, L2 and momentum included), its refusals, and what it says without PyTorch."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from kgreedy.base.errors import KgreedyError
from kgreedy.config.recipe import load_recipe, recipe_from_dict

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file())

# Every layer kind the reference builds: a plain block, psi, max pooling, BN, a k=2
# conv head and a linear last head; stage 3 has a frozen prefix of two blocks.
RAW = {"name": "tiny", "seed": 0, "data": {"source": "digits"},
       "model": {"blocks": [{"width": 8, "downsample": "none"},
                            {"width": 12, "downsample": "psi"},
                            {"width": 16, "downsample": "maxpool"}], "batch_norm": True},
       "aux": {"k": 2, "width": 6, "pool_size": 2, "last_head": "linear"},
       "train": {"batch_size": 16, "mixed_precision": "none",
                 "optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                               "weight_decay": 5e-3, "weight_decay_type": "l2"}}}


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import benchmark_torch

    return benchmark_torch


@pytest.mark.parametrize("stage", [2, 3])
def test_the_reference_is_kgreedys_stage(tools, stage):
    """Given kgreedy's weights, the PyTorch stage gives kgreedy's logits in training
    mode, and two steps of each (SGD with momentum and L2, kgreedy's minimal loop's
    math) leave the same weights in block j and head j."""
    torch = pytest.importorskip("torch")
    import keras
    import tensorflow as tf

    import benchmark_child
    from kgreedy.training.optim import l2_penalty, make_optimizer

    recipe = recipe_from_dict(RAW)
    keras.utils.set_random_seed(0)
    net = benchmark_child.build_net(recipe, (8, 8, 1), 10)
    prefix, block, head = tools.build_stage(torch, recipe, (8, 8, 1), 10, stage)
    tools.copy_from_keras(prefix, block, head, net, stage)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 10
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    features = net.features(x, stage - 1, training=False)
    theirs = net.stage_logits(features, stage, training=True).numpy()
    with torch.no_grad():
        ours = head(block(prefix(x_torch))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

    net.set_trainable_stage(stage)
    variables, config = net.stage_variables(stage), recipe.train.optimizer
    optimizer = make_optimizer(config, config.learning_rate)
    step = tools.make_step(torch, recipe, prefix, block, head)
    for _ in range(2):
        with tf.GradientTape() as tape:
            logits = net.stage_logits(features, stage, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            loss += l2_penalty(config, variables)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        step(x_torch, torch.from_numpy(y))
    np.testing.assert_allclose(block.conv.weight.detach().numpy(),
                               net.modules[stage - 1].conv.kernel.numpy().transpose(3, 2, 0, 1),
                               atol=1e-5)
    np.testing.assert_allclose(head.dense.bias.detach().numpy(),
                               net.heads[stage - 1].dense.bias.numpy(), atol=1e-5)
    # The frozen prefix did not move.
    np.testing.assert_array_equal(
        prefix[0].conv.weight.numpy(), net.modules[0].conv.kernel.numpy().transpose(3, 2, 0, 1))


def test_without_pytorch_it_says_how_to_install(tools, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    assert tools.missing() == ('PyTorch is not installed (pip install -e ".[bench]" adds '
                               "its CPU build)")


@pytest.mark.parametrize("overrides, needle", [
    ({"train": {**RAW["train"], "mixed_precision": "mixed_bfloat16"}}, "float32 only"),
    ({"aux": {**RAW["aux"], "head": "mlp_sr"}}, "conv and linear heads only"),
    ({"aux": {**RAW["aux"], "reduction": 2}}, "without aux.reduction"),
    ({"train": {**RAW["train"], "optimizer": {"name": "adamw", "learning_rate": 0.001}}},
     "SGD only"),
])
def test_it_refuses_what_it_does_not_build(tools, overrides, needle):
    with pytest.raises(KgreedyError, match=needle):
        tools.check_recipe(recipe_from_dict({**RAW, **overrides}))
    with pytest.raises(KgreedyError, match="plain-block recipes"):
        tools.check_recipe(load_recipe(ROOT / "recipes" / "resnet32_cifar10_k4.json"))
    tools.check_recipe(recipe_from_dict(RAW))  # the tiny recipe itself is built

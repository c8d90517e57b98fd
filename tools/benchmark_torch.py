"""A PyTorch reference for tools/benchmark.py's stage step (`--torch`, issue 30).

    python tools/benchmark_torch.py SPEC_JSON

tools/benchmark.py starts this file once per stage when given `--torch`, as it starts
tools/benchmark_child.py for its own rows, and times it the same way: `warmup` untimed
steps, READY on stdout, then `repeats` timed repeats of `steps` steps, images/s their
median. The stage is the one kgreedy trains, written here in PyTorch the way the
paper's own code writes it (NCHW, torch.nn layers): the frozen prefix (modules
1..j-1 in inference mode, no gradient), block j and head j in training mode, softmax
cross-entropy, SGD with momentum and the recipe's L2 (PyTorch's `weight_decay` is the
recipe's `weight_decay_type: l2`), on one synthetic batch. Plain-block recipes with
conv or linear heads, in float32 only; anything else is refused in one line.

PyTorch is an optional extra: `pip install -e ".[bench]"` (its CPU build). Without it
tools/benchmark.py leaves the column out and says why (`missing`). `copy_from_keras`
gives the PyTorch stage a kgreedy net's weights, so that a test can hold the two to
the same logits and the same update.
"""

import importlib.util
import json
import math
import os
import sys

# No TensorFlow here: the child's baseline RSS is PyTorch's alone.
import benchmark_child
from kgreedy import cli
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import write_json
from kgreedy.config.designs import head_designs
from kgreedy.config.recipe import recipe_from_dict

INSTALL = 'pip install -e ".[bench]"'
HEADS = ("conv", "linear")


def missing():
    """Why the PyTorch column cannot be measured here, or None when it can."""
    if importlib.util.find_spec("torch") is None:
        return f"PyTorch is not installed ({INSTALL} adds its CPU build)"
    return None


def check_recipe(recipe):
    """Refuses, in one line, a recipe the reference does not build."""
    if recipe.split or recipe.model.architecture is not None:
        raise KgreedyError("--torch", "the PyTorch reference builds plain-block recipes "
                           "(model.blocks) only", recipe.model.architecture or "a split model")
    kinds = [design.kind for design in head_designs(recipe)]
    if not set(kinds) <= set(HEADS):
        raise KgreedyError("--torch", f"the PyTorch reference builds {' and '.join(HEADS)} "
                           "heads only", kinds)
    if any((design.reduction or 1) != 1 for design in head_designs(recipe)):
        raise KgreedyError("--torch", "the PyTorch reference builds heads without "
                           "aux.reduction", recipe.aux.reduction)
    if recipe.train.optimizer.name != "sgd":
        raise KgreedyError("--torch", "the PyTorch reference trains with SGD only",
                           recipe.train.optimizer.name)
    # `auto` may resolve to float32 (no AVX512-BF16/AMX); the section says what ran.
    if recipe.train.mixed_precision not in ("none", "auto"):
        raise KgreedyError("--torch", "the PyTorch reference runs float32 only; pass "
                           "--set train.mixed_precision=none", recipe.train.mixed_precision)


def _layers(torch):
    """The layer classes, made once torch is imported (it is optional)."""
    nn = torch.nn

    def bn(channels):  # PyTorch's defaults are kgreedy's (model/layers.py)
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)

    class Psi(nn.Module):
        """Space-to-depth in TensorFlow's channel order ((row, col) outer, channel
        inner), so that copied weights give the same numbers."""

        def forward(self, x):
            n, c, h, w = x.shape
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
            return x.reshape(n, 4 * c, h // 2, w // 2)

    class Block(nn.Module):
        """[downsample] conv3x3 [BN] ReLU, as kgreedy's ConvBlock."""

        def __init__(self, cin, width, downsample, batch_norm):
            super().__init__()
            self.pool = {"psi": Psi, "maxpool": lambda: nn.MaxPool2d(2),
                         "avgpool": lambda: nn.AvgPool2d(2)}.get(downsample, nn.Identity)()
            cin = 4 * cin if downsample == "psi" else cin
            self.conv = nn.Conv2d(cin, width, 3, stride=2 if downsample == "stride" else 1,
                                  padding=1, bias=not batch_norm)
            self.bn = bn(width) if batch_norm else nn.Identity()

        def forward(self, x):
            return torch.relu(self.bn(self.conv(self.pool(x))))

    class Head(nn.Module):
        """k-1 conv blocks, an average pool to pool_size, [BN], flatten, linear: the
        paper's auxiliary problem (kgreedy's AuxHead; LinearHead with k=1)."""

        def __init__(self, cin, design, num_classes, batch_norm):
            super().__init__()
            convs, width = [], design.width
            for _ in range((design.k or 1) - 1 if design.kind == "conv" else 0):
                convs.append(Block(cin, width, "none", batch_norm))
                cin = width
            self.convs = nn.Sequential(*convs)
            self.pool = nn.AdaptiveAvgPool2d(design.pool_size)
            self.bn = bn(cin) if batch_norm and design.kind == "conv" else nn.Identity()
            self.dense = nn.Linear(cin * design.pool_size ** 2, num_classes)

        def forward(self, x):
            return self.dense(torch.flatten(self.bn(self.pool(self.convs(x))), 1))

    return Block, Head


def build_stage(torch, recipe, shape, num_classes, stage):
    """(prefix, block, head) of stage `stage` (1-based): the frozen modules 1..j-1 in
    inference mode without gradients, then module j and head j in training mode."""
    Block, Head = _layers(torch)
    batch_norm, blocks = recipe.model.batch_norm, []
    cin = shape[2]
    for spec in recipe.model.blocks[:stage]:
        blocks.append(Block(cin, spec.width, spec.downsample, batch_norm))
        cin = spec.width
    head = Head(cin, head_designs(recipe)[stage - 1], num_classes, batch_norm)
    prefix = torch.nn.Sequential(*blocks[:-1]).eval().requires_grad_(False)
    return prefix, blocks[-1].train(), head.train()


def copy_from_keras(prefix, block, head, net, stage):
    """Gives the PyTorch stage `net`'s weights (a kgreedy GreedyNet built from the same
    recipe): conv kernels HWIO -> OIHW, the dense kernel's rows from (h, w, c) order
    to PyTorch's flatten order (c, h, w), BN's statistics and affine parameters."""
    import torch

    def put(parameter, value):
        parameter.data.copy_(torch.as_tensor(value))

    def conv_block(ours, theirs):
        put(ours.conv.weight, theirs.conv.kernel.numpy().transpose(3, 2, 0, 1))
        if theirs.conv.use_bias:
            put(ours.conv.bias, theirs.conv.bias.numpy())
        if theirs.bn is not None:
            batch_norm(ours.bn, theirs.bn)

    def batch_norm(ours, theirs):
        for name, variable in (("weight", theirs.gamma), ("bias", theirs.beta),
                               ("running_mean", theirs.moving_mean),
                               ("running_var", theirs.moving_variance)):
            put(getattr(ours, name), variable.numpy())

    for ours, theirs in zip([*prefix, block], net.modules[:stage]):
        conv_block(ours, theirs)
    theirs = net.heads[stage - 1]
    for ours, conv in zip(head.convs, getattr(theirs, "convs", [])):
        conv_block(ours, conv)
    if getattr(theirs, "bn", None) is not None:
        batch_norm(head.bn, theirs.bn)
    kernel = theirs.dense.kernel.numpy()
    side, channels = head.pool.output_size, head.dense.in_features // head.pool.output_size ** 2
    kernel = kernel.reshape(side, side, channels, -1).transpose(2, 0, 1, 3)
    put(head.dense.weight, kernel.reshape(-1, kernel.shape[-1]).T)
    put(head.dense.bias, theirs.dense.bias.numpy())


def make_step(torch, recipe, prefix, block, head):
    """One training step of the stage, as kgreedy's: returns step(x, y) -> loss."""
    config = recipe.train.optimizer
    decay = config.weight_decay if config.weight_decay_type == "l2" else 0.0
    optimizer = torch.optim.SGD([*block.parameters(), *head.parameters()],
                                lr=config.learning_rate, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=decay)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            features = prefix(x)
        loss = loss_fn(head(block(features)), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def stage_steps(torch, spec):
    """(run_steps(n), last_loss()) of the reference stage a spec names (its recipe,
    `stage`, `image_shape`, `num_classes`), on one synthetic batch: standard-normal
    images, as the TensorFlow rows' (their net standardises with mean 0 / std 1,
    which the reference leaves out)."""
    recipe = recipe_from_dict(spec["recipe"])
    check_recipe(recipe)
    torch.manual_seed(recipe.seed)
    shape, num_classes = tuple(spec["image_shape"]), spec["num_classes"]
    prefix, block, head = build_stage(torch, recipe, shape, num_classes, spec["stage"])
    batch = recipe.train.batch_size
    x = torch.randn(batch, shape[2], shape[0], shape[1])
    y = torch.randint(0, num_classes, (batch,))
    step, last = make_step(torch, recipe, prefix, block, head), [None]

    def run_steps(n):
        for _ in range(n):
            last[0] = step(x, y)

    return run_steps, lambda: float(last[0])


def measure(spec):
    """The child: one stage's images/s and peak memory, written to spec['result']."""
    import torch

    baseline = benchmark_child.rss_mb()
    run_steps, last_loss = stage_steps(torch, spec)
    seconds = benchmark_child.timed(run_steps, last_loss, spec, 1)
    result = benchmark_child.figures(
        seconds, recipe_from_dict(spec["recipe"]).train.batch_size * spec["steps"], baseline)
    if not math.isfinite(last_loss()):
        raise SystemExit(f"benchmark: the PyTorch loss is {last_loss()}")
    write_json(spec["result"], {
        **result, "gpu_peak_mb": None,
        "precision": "none", "precision_note": None, "keras_policy": None,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")})
    return cli.EXIT_OK


def main(argv=None):
    """`python tools/benchmark_torch.py SPEC_JSON`; started by tools/benchmark.py."""
    parser = cli.ArgumentParser(
        prog="python tools/benchmark_torch.py",
        description="The PyTorch reference stage of tools/benchmark.py --torch, in this "
                    "fresh process (started by it; not meant to be run by hand).")
    parser.add_argument("spec", metavar="SPEC_JSON", help="what to measure, as JSON")
    spec = json.loads(parser.parse_args(argv).spec)
    reason = missing()
    if reason:
        raise KgreedyError("--torch", reason, sys.executable)
    return measure(spec)


if __name__ == "__main__":
    sys.exit(cli.run(main))

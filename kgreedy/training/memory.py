"""How much memory a run's stages need, found before anything is allocated.

`estimate` sizes every stage the run trains on the recipe's net, built without its
weights for a block trunk (`keras.StatelessScope(initialize_variables=False)` defers
every variable: a 10-million-channel block costs nothing), and `check` refuses a
recipe whose largest stage cannot fit in `available_bytes`. `kgreedy.train` runs
both before the data is read and the run directory made; `--dry-run` prints them.

A stage's estimate, in bytes (docs/DESIGN.md, "Decisions and known limits"):
- weights: every variable of the net, float32 (the trainer builds every module and
  head at once, so all of them live through every stage);
- optimizer: the stage's trainable parameters x slots (SGD with momentum 1, without
  0; AdamW 2), float32; gradients: the trainable parameters once more;
- activations at the global batch size: the input batch as the pipeline gives it
  (float32), then, in the compute dtype (2 bytes under mixed precision, else 4),
  what the backward pass keeps (`_activations`);
- feature cache: the cached prefix output when the stage keeps it in memory;
- replay buffers: a decoupled run's (`train.decoupled.buffer_size`).
No safety factor is added: a training step measured 7-35% above the activations
figure (imagenet_k3 stage 2 at 112 px, cifar10_k3 stage 2), so a recipe refused
would not have fitted, and one that fits is never refused.
"""

import contextlib
import dataclasses
import math
import types

import keras
import tensorflow as tf

from kgreedy.base.errors import KgreedyError
from kgreedy.base.machine import available_bytes, format_bytes
from kgreedy.data.datasets import counted, memory_bytes
from kgreedy.model.from_recipe import from_recipe
from kgreedy.model.layers import BatchNorm
from kgreedy.model.network import count_params
from kgreedy.training.cache import feature_bytes, use_cache
from kgreedy.training.decoupled import buffer_dtype

_MIXED = ("mixed_float16", "mixed_bfloat16")
# Batches tf.data holds ahead of the step (prefetch, map and batch buffers): about
# 4.7 measured on a CIFAR-10 pipeline alone (tools/memory_estimate.py's allocator).
PIPELINE_BATCHES = 5
# The trained parameters' gradients, and three temporaries of their size while the
# step runs (the L2 term and its gradient, the optimizer's arithmetic): measured on
# the quickstart's stage 3, whose 448,266 parameters outweigh its activations
# (9.9 MB above the stage's resting tensors; 4 x 1.7 MB + 2.4 MB of activations).
GRADIENT_COPIES = 4
# TensorFlow's own small tensors while a stage runs (the step's scalars, metric
# sums, summaries): about 1 MB on the quickstart, where nothing else hides them.
RUNTIME_BYTES = 2 ** 20


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """The bytes one stage holds while it trains (see the module docstring)."""

    stage: int
    batch_size: int
    weights: int
    optimizer: int
    gradients: int
    activations: int
    feature_cache: int = 0
    replay_buffers: int = 0
    evaluation: int = 0
    data: int = 0

    @property
    def total(self):
        # Evaluation runs between training steps, never with them.
        return (self.weights + self.optimizer + self.gradients
                + max(self.activations, self.evaluation) + self.feature_cache
                + self.replay_buffers + self.data + RUNTIME_BYTES)

    def describe(self):
        """`stage 2 1.2 GB (weights 3.0 MB, ..., activations 1.1 GB at batch 128)`."""
        return f"stage {self.stage} {self.need()}"

    def need(self):
        """`1.2 GB (weights 3.0 MB, ..., activations 1.1 GB at batch 128)`: the total
        and its parts, as the dry run and every refusal say them."""
        parts = [f"weights {format_bytes(self.weights)}",
                 f"optimizer {format_bytes(self.optimizer)}",
                 f"gradients {format_bytes(self.gradients)}",
                 f"activations {format_bytes(self.activations)} at batch "
                 f"{self.batch_size}"]
        if self.feature_cache:
            parts.append(f"feature cache {format_bytes(self.feature_cache)}")
        if self.replay_buffers:
            parts.append(f"replay buffers {format_bytes(self.replay_buffers)}")
        if self.evaluation > self.activations:
            parts.append(f"evaluation {format_bytes(self.evaluation)}")
        if self.data:
            parts.append(f"data {format_bytes(self.data)}")
        parts.append(f"runtime {format_bytes(RUNTIME_BYTES)}")
        return f"{format_bytes(self.total)} ({', '.join(parts)})"


@contextlib.contextmanager
def _deferred_variables():
    """Variables made inside are shapes without values, and stay so.

    Keras lists deferred variables globally and gives them values when the next
    StatelessScope closes outside any other: the list is put back as it was, so a
    later scope never allocates this net's (possibly enormous) weights.
    """
    # Private, and only here: Keras has no public way to put its list of deferred
    # variables back. keras.utils.clear_session would empty it, but also every other
    # model's state and the layer-name counters; and Keras' own symbolic calls
    # (compute_output_spec) close a StatelessScope, so the list must not keep them.
    from keras.src.backend.common import global_state

    saved = list(global_state.get_global_attribute("uninitialized_variables") or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute("uninitialized_variables", saved)


def build_net(recipe, spec):
    """The recipe's `GreedyNet` to size, built without its weights for a block trunk.

    A split model is built with them: a `.keras` file cannot load without values,
    and building it is the check that the model loads and splits, which the run
    needs before anything is written in any case.

    Raises:
        KgreedyError: the model cannot be built, loaded or split as the recipe asks.
    """
    channels = spec.image_shape[2]
    args = (recipe, spec.image_shape, spec.num_classes, [0.0] * channels, [1.0] * channels)
    if recipe.split:
        return from_recipe(*args)
    with _deferred_variables():
        return from_recipe(*args)


def estimate(recipe, spec, num_workers=1, net=None, remat=False, slots=None,
             replicas=1, data_bytes=None):
    """(net, stage estimates, note): a `StageMemory` for every stage the run trains.

    Args:
        recipe: a validated `Recipe`, `auto` precision resolved (else sized as float32).
        spec: the data's `DatasetSpec` (`kgreedy.data.describe`).
        num_workers: workers of the run (the feature cache is off with several).
        net: the net to size (default: `build_net(recipe, spec)`).
        remat: size end to end as if each module were recomputed whole in the backward
            pass (`tf.recompute_grad` around each module, `_rematerialised`); for the
            dry run's comparison, not what a run does.
        slots: optimizer slots per trained parameter (default: those of
            `train.optimizer`; `kgreedy.fit` counts its caller's optimizer's).
        replicas: replicas of the strategy on this host's CPU: each keeps its own
            copy of the variables, their slots and gradients (the global batch's
            activations are shared out among them).
        data_bytes: what the loaded data keeps in memory (default:
            `kgreedy.data.datasets.memory_bytes`; `kgreedy.fit`'s caller's pipeline: 0).

    Returns:
        The net sized, the estimates and None; or, where a block trunk cannot be
        built without weights, (None, None, why): nothing is sized then, rather
        than the run refused.

    Raises:
        KgreedyError: the model cannot be built, loaded or split as the recipe asks.
    """
    if net is None:
        try:
            net = build_net(recipe, spec)
        except KgreedyError:
            raise
        except Exception as e:  # noqa: BLE001 - a layer that needs values to build
            if recipe.split:
                raise  # built with its weights: the failure is the run's own
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            return None, None, (f"no estimate: the net cannot be built without its "
                                f"weights ({type(e).__name__}: {reason})")
    train, mode = recipe.train, recipe.train.mode
    dtype = dtype_bytes(train)
    if slots is None:
        slots = 2 if train.optimizer.name == "adamw" else int(train.optimizer.momentum > 0)
    every_part = [part for j in range(1, net.num_stages + 1) for part in _parts(net, j)]
    weights = 4 * count_params([w for layer in (*net.modules, *net.heads, *every_part)
                                for w in layer.weights])
    # The digits' count is known once loaded: sized here as all 1,797 (the cache).
    sizing = counted(recipe.data, spec)
    data = types.SimpleNamespace(spec=sizing, augmented=recipe.data.augment != "none")
    kept = memory_bytes(recipe.data, spec) if data_bytes is None else data_bytes
    eval_batch = train.eval_batch_size or train.batch_size
    stages = []
    for j in ([net.num_stages] if mode != "greedy" else range(1, net.num_stages + 1)):
        cached = mode == "greedy" and use_cache(recipe.train, data, j, num_workers, net)
        trained = ([*net.modules, *net.heads, *every_part] if mode == "decoupled" else
                   [*net.modules[:j], net.heads[j - 1], *_parts(net, j)]
                   if mode == "end_to_end" else
                   [net.modules[j - 1], net.heads[j - 1], *_parts(net, j)])
        params = count_params(_trainable(trained))
        # The batch as the pipeline gives it (float32): images, or cached features.
        batch_input = 4 * math.prod(net.stage_shapes[j - 2] if cached else spec.image_shape)
        cache = feature_bytes(net, j, data) if cached else 0
        buffers = replay_buffer_bytes(net, train) if mode == "decoupled" else 0
        stages.append(StageMemory(
            j, train.batch_size, replicas * weights, replicas * 4 * slots * params,
            replicas * 4 * GRADIENT_COPIES * params,
            train.batch_size * ((1 + PIPELINE_BATCHES) * batch_input
                                + (dtype * _rematerialised(net, spec) if remat else
                                   _activations(net, mode, j, cached, spec, dtype))),
            # FeatureCache keeps all features in memory up to the limit, else on disk.
            cache if cache <= train.cache_memory_mb * 2 ** 20 else 0, buffers,
            eval_batch * (batch_input + dtype * _evaluation(net, mode, j, cached)),
            kept))
    return net, stages, None


def _trainable(layers):
    """The variables of `layers` that an optimizer updates when they train: not BN's
    moving statistics. Read from each layer's own list, not `trainable_weights`,
    which is empty for a layer frozen now (a net that `kgreedy.fit` trained before)."""
    # Keras' walk over nested layers and its per-layer list (no public equivalent).
    return [v for layer in layers
            for leaf in layer._flatten_layers(include_self=True, recursive=True)
            for v in leaf._trainable_variables]


def dtype_bytes(train):
    """Bytes of one activation value in the run's compute dtype."""
    return 2 if train.mixed_precision in _MIXED else 4


def replay_buffer_bytes(net, train, size=None):
    """A decoupled run's replay buffers: `size` (default `train.decoupled.buffer_size`)
    outputs of modules 1..J-1 each, in `decoupled.buffer_dtype`, and their images in
    float32 where the objective rebuilds the image."""
    size = train.decoupled.buffer_size if size is None else size
    dtype_bytes = buffer_dtype(train.mixed_precision).size
    images = 4 * math.prod(net.image_shape) if net.objective.needs_images else 0
    return size * sum(dtype_bytes * math.prod(s) + images for s in net.stage_shapes[:-1])


def _parts(net, stage):
    """The layers of module `stage`'s objective (decoder, projection head), if any."""
    return list(net.parts[stage - 1].values())


def _activations(net, mode, stage, cached, spec, dtype=4):
    """Bytes per example alive at the stage's peak, past the input batch, in the
    compute dtype of `dtype` bytes.

    What the backward pass keeps: the trained part's input and the output of each
    of its weighted layers (a conv's input is the output before it, a BN's output
    stands in for the ReLU's after it; under mixed precision a BN, which computes in
    float32, also keeps a float32 copy of its input). The backward runs the layers
    in reverse: while layer L's runs, what layers before L keep is still alive, and
    L holds the gradients into and out of it, plus, for Keras' own BN, a temporary
    of the larger (kgreedy's fused BN makes none; measured with
    tools/memory_estimate.py on the quickstart, CIFAR-10 ResNet-32 and the budget
    network, where counting every kept tensor beside the largest backward put the
    quickstart's stage 1 30 % over). The peak is the largest of these and of the
    forward's end. The trained part's first weighted layer (in build order) has no
    gradient out: its input is frozen features, an image or a stopped gradient, and
    the traced step prunes the unused input gradient; its backward holds the
    gradient into it and one of its size. BN's backward runs in float32. A frozen
    prefix runs forward only, one layer's input and output at a time, before the
    trained part starts: the larger of the two is the peak.
    """
    modules, heads = net.modules, net.heads
    if mode == "decoupled":  # module j's tensors are freed before module j+1 runs
        parts = [[modules[j], heads[j], *_parts(net, j + 1)] for j in range(net.num_stages)]
        inputs = [spec.image_shape, *net.stage_shapes[:-1]]
    elif mode == "end_to_end":
        parts = [[*modules[:stage], heads[stage - 1], *_parts(net, stage)]]
        inputs = [spec.image_shape]
    else:
        parts = [[modules[stage - 1], heads[stage - 1], *_parts(net, stage)]]
        inputs = [net.stage_shapes[stage - 2] if stage > 1 else spec.image_shape]
    peak = 0
    for part, shape in zip(parts, inputs):
        layers = [leaf for layer in part for leaf in _weighted_leaves(layer)]
        # Cached features are the input batch itself, counted already.
        peak = max(peak, _backward_peak(layers, dtype * (0 if cached else math.prod(shape)),
                                        dtype))
    if mode == "greedy" and not cached:
        prefix = [dtype * (i + o) for m in modules[:stage - 1]
                  for i, o in weighted_layers(m)]
        peak = max([peak, *prefix])
    return peak


def _backward_peak(layers, alive, dtype, norm_dtype=4, first=True):
    """The largest of `alive` plus what `_activations` says layer L's backward holds
    with the layers before it, over `layers` (`_weighted_leaves`), and of the
    forward's end; `first`: the first layer sends no gradient back."""
    peak = 0
    for j, (i, o, norm, fused) in enumerate(layers):
        temporary = max(i, o) if norm and not fused else 0
        grads = o + (o if first and j == 0 else i) + temporary
        peak = max(peak, alive + (norm_dtype if norm else dtype) * grads)
        alive += dtype * o + ((norm_dtype - dtype) * o if norm else 0)
    return max(peak, alive)


def _evaluation(net, mode, stage, cached):
    """Elements per example alive while a stage evaluates, past the input batch:
    the deployed layers (a decoupled run: every module and head) run forward only,
    one layer's input and output at a time."""
    if mode == "greedy":
        parts = [net.modules[stage - 1]] if cached else list(net.modules[:stage])
        parts.append(net.heads[stage - 1])
    else:
        parts = [*net.modules, *(net.heads if mode == "decoupled" else net.heads[-1:])]
    return max((i + o for part in parts for i, o in weighted_layers(part)), default=0)


def _rematerialised(net, spec):
    """`_activations` end to end with each module rematerialised whole: the forward
    keeps only every module's input (the image and modules 1..K-1's outputs); the
    backward runs module by module, each recomputed, keeping what its own backward
    pass keeps while it runs (`_backward_peak`). The last head is trained as usual."""
    inputs = [spec.image_shape, *net.stage_shapes[:-1]]
    boundaries = sum(math.prod(shape) for shape in inputs)
    peak = 0
    for j, module in enumerate(net.modules):
        part = [module, *((net.heads[-1], *_parts(net, len(net.modules)))
                          if j == len(net.modules) - 1 else ())]
        sizes = [size for layer in part for size in _weighted_leaves(layer)]
        peak = max(peak, _backward_peak(sizes, 0, 1, 1, first=j == 0))
    return boundaries + peak


def weighted_layers(layer):
    """(input, output) elements per example of each innermost layer with weights in
    `layer`, from the shape it was built on; a layer built on several inputs, or
    not built, is left out."""
    return [(i, o) for i, o, _, _ in _weighted_leaves(layer)]


def _weighted_leaves(layer):
    """`weighted_layers` with two more items: whether the layer is a normalization
    (Keras' BatchNormalization computes in float32 under mixed precision), and
    whether it is kgreedy's fused BatchNorm (whose backward makes no temporary)."""
    sizes = []
    # Keras' own walk over nested layers and models (no public equivalent).
    for leaf in layer._flatten_layers(include_self=True, recursive=True):
        if not leaf.weights or list(leaf._flatten_layers(include_self=False)):
            continue
        shape = (leaf.get_build_config() or {}).get("input_shape")
        if not shape:
            continue
        try:
            out = leaf.compute_output_shape(shape)
        except Exception:  # noqa: BLE001 - any layer's own shape rule: assume same size
            out = shape
        fused = (isinstance(leaf, BatchNorm) and leaf.fused and not leaf.synchronized
                 and len(shape) == 4)
        sizes.append((_elements(shape), _elements(out),
                      isinstance(leaf, keras.layers.BatchNormalization), fused))
    return sizes


def _elements(shape):
    """Elements per example of a (batch, ...) shape; unknown sides count as 1."""
    return math.prod(d or 1 for d in tuple(shape)[1:])


def largest(stages):
    """The stage estimate with the most bytes (None for none)."""
    return max(stages, key=lambda s: s.total, default=None)


# What to change when a part of the estimate is most of it: (key, advice).
_ADVICE = {
    "activations": ("train.batch_size", "use a smaller train.batch_size or a narrower "
                    "model (model.blocks[*].width, aux.width)"),
    "model": ("model", "use a narrower model (model.blocks[*].width, aux.width) or "
              "fewer stages"),
    "feature_cache": ("train.cache_memory_mb", "lower train.cache_memory_mb (cached "
                      "features then go to disk) or set train.cache_features 'off'"),
    "replay_buffers": ("train.decoupled.buffer_size", "use a smaller "
                       "train.decoupled.buffer_size"),
}


def check(stages, available, budget=None, what_fits=None):
    """Refuses a run whose largest stage needs more than its `budget` (bytes, with
    how a message names it; None: no budget) or than `available` bytes (None:
    unknown, never refused). The estimate is the rule: no margin is added.

    Args:
        stages: the run's `StageMemory` estimates.
        available: what this machine has available, in bytes, or None.
        budget: a `kgreedy.training.budget.Budget`, or None.
        what_fits: called with the limit in bytes, returns what would fit (a phrase
            for the message; `kgreedy.training.budget.what_fits`), or None.

    Raises:
        KgreedyError: about the recipe key of the largest part of that stage
            (train.batch_size for activations, model for weights, optimizer and
            gradients, or the feature cache's or replay buffers' key); not the
            batch size when the other parts alone do not fit.
    """
    worst = largest(stages or ())
    if worst is not None and budget is not None and worst.total > budget.limit:
        fits = what_fits(budget.limit) if what_fits else None
        raise KgreedyError("train.memory_budget",
                           f"stage {worst.stage} needs about {worst.need()}, more than "
                           f"{budget.name}; " + (f"what would fit: {fits}" if fits else
                                                 "nothing smaller was found to fit"),
                           budget.received)
    if available is None or worst is None or worst.total <= available:
        return
    parts = {"activations": worst.activations,
             "model": worst.weights + worst.optimizer + worst.gradients,
             "feature_cache": worst.feature_cache, "replay_buffers": worst.replay_buffers}
    if worst.total - worst.activations > available:
        # No batch size helps when the rest alone does not fit: name what does.
        del parts["activations"]
    key, advice = _ADVICE[max(parts, key=parts.get)]
    message = (f"stage {worst.stage} needs about {worst.need()}, more than the "
               f"{format_bytes(available)} of memory available on this machine; {advice}")
    if key == "train.batch_size":
        raise KgreedyError(key, message, worst.batch_size)
    raise KgreedyError(key, message)


def available_for_training():
    """(bytes, why): what a run's stages are checked against. `available_bytes()`
    on a CPU; None on a machine where TensorFlow sees a GPU, since the activations
    then live in the GPU's memory, whose size TensorFlow does not tell, so host
    memory would refuse wrongly. `why` says why there is no figure, else None."""
    if gpus():
        return None, "not checked: training runs on GPU"
    available = available_bytes()
    return available, None if available is not None else "unknown, not checked"


def host_replicas(strategy, worker):
    """Replicas whose copies of the variables share this host's memory: the CPU's
    logical devices of a mirrored run (1 where TensorFlow sees a GPU: each replica's
    copy is in its own GPU's memory)."""
    return 1 if gpus() else max(1, strategy.num_replicas_in_sync // worker.num_workers)


def gpus():
    """The GPUs TensorFlow sees (a function: tests replace it)."""
    return tf.config.list_physical_devices("GPU")



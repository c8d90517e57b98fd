"""A run planned against the memory it is given: `train.memory_budget`,
`model.modules: "auto"`, what would fit when nothing does, and the dry run's
comparison of modes.

Every figure is `kgreedy.training.memory.estimate`'s, on the net built without its
weights (a split model: with them), so planning allocates nothing a run would.

- `resolve_budget`: the budget in bytes: a size (`"12GB"`, units of 1024), or
  `"auto"`: what the device has free (host: `available_bytes`; GPU: nvidia-smi's
  free memory of the least free GPU).
- `choose_modules`: `model.modules: "auto"` becomes the fewest modules, balanced by
  memory, whose largest stage fits, trying K = 1, 2, ... in order (`fewest_modules`).
- `what_fits`: the phrase a refusal ends with: the largest batch size that fits, the
  fewest modules that fit (a model split into `model.modules`), a smaller replay
  buffer, and the other modes that fit.
- `compare_modes`: end to end, end to end with each module recomputed in the backward
  pass (rematerialisation at module granularity), each greedy stage and the
  decoupled step, on the same net and batch, for `--dry-run`.
"""

import dataclasses
import math
import shutil
import subprocess
import types

import keras
import numpy as np

from kgreedy.base.errors import KgreedyError
from kgreedy.base.machine import available_bytes, format_bytes, is_budget, parse_bytes
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.network import count_params
from kgreedy.model.split import SplitError
from kgreedy.training import memory

AUTO = "auto"
MOST_MODULES = 64  # model.modules "auto" tries no more
MODES = ("greedy", "decoupled", "end_to_end")
_NVIDIA_SMI_SECONDS = 20


@dataclasses.dataclass(frozen=True)
class Budget:
    """`train.memory_budget` resolved: `limit` bytes, `name` as a message says it,
    `received` as the recipe gave it."""

    limit: int
    name: str
    received: str


def resolve_budget(train):
    """The run's `Budget`, or None without `train.memory_budget`.

    Raises:
        KgreedyError: `"auto"` where the device's free memory cannot be read.
    """
    text = train.memory_budget
    if text is None:
        return None
    if text != AUTO:
        limit = parse_bytes(text)
        return Budget(limit, f"the memory budget of {format_bytes(limit)}", text)
    free, device, why = _device_free()
    if free is None:
        raise KgreedyError("train.memory_budget", f"'auto' needs the free memory of "
                           f"the {device}, which cannot be read here ({why}); give a size "
                           "such as '12GB'", text)
    return Budget(free, f"the {format_bytes(free)} the {device} has free "
                        "(train.memory_budget 'auto')", text)


def _device_free():
    """(bytes, device, why): the free memory of the device a run trains on."""
    if memory.gpus():
        # TensorFlow reports what it allocated, not what the GPU has free.
        if shutil.which("nvidia-smi") is None:
            return None, "GPU", "nvidia-smi is not on PATH"
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=_NVIDIA_SMI_SECONDS, check=True)
            free = [int(line) * 2 ** 20 for line in out.stdout.split()]
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            return None, "GPU", f"nvidia-smi failed: {type(e).__name__}"
        return (min(free) if free else None), "GPU", "nvidia-smi listed no GPU"
    free = available_bytes()
    return free, "host", "no /proc/meminfo or cgroup figure"


def largest_need(recipe, spec, num_workers=1, net=None, remat=False):
    """(net, the largest stage's bytes) of `recipe`; (None, None) where the net
    cannot be sized without its weights.

    Raises:
        SplitError: the model cannot be split as the recipe asks (too many modules).
    """
    net, stages, _ = memory.estimate(recipe, spec, num_workers, net=net, remat=remat)
    worst = memory.largest(stages or ())
    return net, (None if worst is None else worst.total)


def with_modules(recipe, modules):
    """`recipe` with `model.modules` set, balanced by memory."""
    return dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, modules=modules, balanced_memory=True))


def with_mode(recipe, mode):
    """`recipe` in `train.mode` `mode` (no replay buffer outside decoupled), unchecked:
    only for sizing."""
    train = recipe.train
    decoupled = (train.decoupled if mode == "decoupled"
                 else dataclasses.replace(train.decoupled, buffer_size=0))
    return dataclasses.replace(recipe, train=dataclasses.replace(
        train, mode=mode, decoupled=decoupled))


def fewest_modules(recipe, spec, limit, num_workers=1, start=1):
    """(K, need, tried): the fewest modules from `start` whose largest stage needs at
    most `limit` bytes (K None if none does), its need, and {K: need} of every K
    sized (None: more modules than the model has places to split).

    Every K is tried in order, up to `MOST_MODULES`: a stage's need falls as K grows,
    but not strictly (ResNet-20 on digits: 6 modules need 936 bytes more than 5), so
    no K can be skipped. A limit below what any K needs (`least_need`) stops at the
    first K."""
    tried, floor = {}, None
    for k in range(start, MOST_MODULES + 1):
        try:
            net, tried[k] = largest_need(with_modules(recipe, k), spec, num_workers)
        except SplitError:
            tried[k] = None
            break
        if tried[k] is not None and tried[k] <= limit:
            return k, tried[k], tried
        floor = least_need(net, recipe.train) if floor is None else floor
        if limit < floor:
            break
    return None, None, tried


def least_need(net, train):
    """Bytes no number of modules goes below: the trunk's weights, and the input and
    output of its largest weighted layer at the batch size (the stage that trains
    it keeps both)."""
    weights = 4 * count_params([w for m in net.modules for w in m.weights])
    largest = max((i + o for m in net.modules for i, o in memory.weighted_layers(m)),
                  default=0)
    return weights + train.batch_size * memory.dtype_bytes(train) * largest


def choose_modules(recipe, spec, budget, num_workers=1):
    """(recipe, plan): `model.modules: "auto"` resolved against `budget` (a `Budget`;
    None: what the machine has available), and one line saying what was chosen.

    Raises:
        KgreedyError: no number of modules fits, or the limit is unknown.
    """
    limit, name = ((budget.limit, budget.name) if budget is not None else
                   (available_bytes(), "the memory available on this machine"))
    if limit is None:
        raise KgreedyError("model.modules", "'auto' needs a memory to fit: set "
                           "train.memory_budget (this machine's available memory is "
                           "unknown)", AUTO)
    k, need, tried = fewest_modules(recipe, spec, limit, num_workers)
    if k is None:
        sized = {j: n for j, n in tried.items() if n is not None}
        least = min(sized, key=sized.get)
        raise KgreedyError("model.modules", f"'auto' found no number of modules whose "
                           f"largest stage fits {name}: the least need is "
                           f"{format_bytes(sized[least])}, at {least} modules; "
                           "use a smaller train.batch_size or a larger budget", AUTO)
    fewer = tried.get(k - 1)
    # Validated again: aux.per_stage, say, may list more stages than were chosen.
    return recipe_from_dict(with_modules(recipe, k).to_dict()), (
        f"memory plan: model.modules 'auto' -> {k} modules balanced by memory: the "
        f"largest stage needs {format_bytes(need)}, within {name}"
        + (f" ({k - 1} module{'s' if k > 2 else ''} would need {format_bytes(fewer)})"
           if fewer else ""))


def what_fits(recipe, spec, net, stages, num_workers=1, replicas=1):
    """A function of the limit in bytes giving the phrase a refusal ends with
    (`memory.check`'s `what_fits`), or None where nothing was found to fit."""
    def phrase(limit):
        options = []
        batch = _batch_that_fits(stages, limit, replicas)
        if batch:
            options.append(f"train.batch_size {batch}")
        model, train = recipe.model, recipe.train
        if recipe.split and model.split_at is None and train.mode != "end_to_end":
            k = fewest_modules(recipe, spec, limit, num_workers, start=model.modules + 1)[0]
            if k is not None:
                options.append(f"model.modules {k}")
        buffer = _buffer_that_fits(net, train, stages, limit)
        if buffer:
            options.append(f"train.decoupled.buffer_size {buffer}")
        for mode in (m for m in MODES if m != train.mode):
            need = largest_need(with_mode(recipe, mode), spec, num_workers, net=net)[1]
            if need is not None and need <= limit:
                options.append(f"train.mode '{mode}' ({format_bytes(need)})")
        return (", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1
                else options[0] if options else None)
    return phrase


def _batch_that_fits(stages, limit, replicas):
    """The largest batch size (a multiple of `replicas`) at which every stage fits,
    activations scaling with the batch and the rest not; 0 when none does."""
    batch = min(math.floor((limit - (s.total - s.activations))
                           / (s.activations / s.batch_size)) if s.activations else
                (math.inf if s.total <= limit else 0) for s in stages)
    if batch == math.inf:
        return 0  # nothing scales with the batch: no batch size is the answer
    return max(0, batch - batch % replicas)


def _buffer_that_fits(net, train, stages, limit):
    """A decoupled run's largest replay buffer (at least one batch) that fits; 0 when
    there is none or none fits."""
    if train.mode != "decoupled" or not train.decoupled.buffer_size:
        return 0
    worst = memory.largest(stages)
    per_output = memory.replay_buffer_bytes(net, train, 1)
    size = math.floor((limit - (worst.total - worst.replay_buffers)) / per_output)
    return size if size >= train.batch_size else 0


def compare_modes(recipe, spec, net, num_workers=1):
    """[(label, bytes)]: the largest need of each way to train `net` at the recipe's
    batch size, for `--dry-run`: end to end, end to end with every module
    rematerialised, each greedy stage, and the decoupled step (with the recipe's
    replay buffer)."""
    rows = []
    for label, variant, remat in (("end to end", "end_to_end", False),
                                  ("end to end, modules recomputed", "end_to_end", True)):
        rows.append((label, largest_need(with_mode(recipe, variant), spec, num_workers,
                                         net=net, remat=remat)[1]))
    _, stages, _ = memory.estimate(with_mode(recipe, "greedy"), spec, num_workers, net=net)
    rows += [(f"greedy stage {s.stage}", s.total) for s in stages]
    rows.append(("decoupled", largest_need(with_mode(recipe, "decoupled"), spec,
                                           num_workers, net=net)[1]))
    return rows


def print_comparison(rows, batch_size, budget, available):
    """Prints `compare_modes`' rows, each against the smaller of the budget and
    what is available (either None: not compared)."""
    against = [(limit, name) for limit, name in (
        (budget.limit if budget else None, budget.name if budget else None),
        (available, f"the {format_bytes(available or 0)} available"))
        if limit is not None]
    limit, name = min(against) if against else (None, None)
    print(f"memory by mode at batch {batch_size}"
          + (f", against {name}:" if limit is not None else ":"))
    width = max(len(label) for label, _ in rows)
    for label, need in rows:
        verdict = ("" if limit is None or need is None
                   else "  fits" if need <= limit else "  does not fit")
        shown = "unknown" if need is None else format_bytes(need)
        print(f"  {label:<{width}}  {shown:>9}{verdict}")


def optimizer_slots(make_optimizer):
    """Variables `make_optimizer()` keeps per trained variable (SGD with momentum 1,
    Adam 2): two fresh optimizers are built on one and on two small variables, and
    their variable counts compared."""
    counts = []
    for n in (1, 2):
        optimizer = make_optimizer()
        optimizer.build([keras.Variable(np.zeros(1, "float32")) for _ in range(n)])
        counts.append(len(optimizer.variables))
    return counts[1] - counts[0]


def check_fit(net, train, memory_budget, slots):
    """`kgreedy.fit`'s `memory_budget`: refuses a fit of `net` in `train.mode` whose
    largest stage needs more, in Keras' words, naming the modes that would fit.

    Args:
        net: the `SplitNet`.
        train: the fit's `TrainConfig` (mode, batch size, precision).
        memory_budget: a size (`"12GB"`), `"auto"` or None (nothing checked).
        slots: the optimizer's slots per trained parameter (`optimizer_slots`).

    Raises:
        ValueError: `memory_budget` is not a size, or the fit does not fit it.
    """
    if memory_budget is None:
        return
    if not is_budget(memory_budget):
        raise ValueError("`memory_budget` must be a size such as '12GB' or '512MB' "
                         "(B, KB, MB, GB, TB; units of 1024), 'auto' or None. Received: "
                         f"memory_budget={memory_budget!r}")
    # Sized in the compute dtype of Keras' global policy, which the fit trains in.
    policy = keras.mixed_precision.global_policy().name
    train = dataclasses.replace(train, memory_budget=memory_budget,
                                mixed_precision=policy if policy.startswith("mixed")
                                else "none")
    try:
        limit = resolve_budget(train)
    except KgreedyError as e:
        raise ValueError(f"`memory_budget` {e.message}. Received: "
                         f"memory_budget={memory_budget!r}") from None
    def largest_in(mode):
        # What `memory.estimate` reads of a recipe; the caller's data is not augmented
        # by kgreedy, and its features are never cached.
        sizing = types.SimpleNamespace(train=dataclasses.replace(train, mode=mode),
                                       data=types.SimpleNamespace(augment="none",
                                                                  source=None))
        return memory.largest(memory.estimate(sizing, net.spec, net=net, slots=slots,
                                              data_bytes=0)[1])

    worst = largest_in(train.mode)
    if worst.total <= limit.limit:
        return
    others = [(mode, largest_in(mode).total) for mode in MODES if mode != train.mode]
    fits = [f"mode={mode!r} ({format_bytes(need)})" for mode, need in others
            if need <= limit.limit]
    batch = _batch_that_fits([worst], limit.limit, 1)
    if batch:
        fits.append(f"batches of {batch} image{'s' if batch > 1 else ''}")
    raise ValueError(
        f"Stage {worst.stage} of this {train.mode} fit needs about {worst.need()}, more than "
        f"{limit.name.replace(' (train.memory_budget', ' (memory_budget')}; "
        + ("what would fit: " + ", ".join(fits) if fits else "nothing smaller fits")
        + f". Received: memory_budget={memory_budget!r}, mode={train.mode!r}")

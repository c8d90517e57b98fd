"""`train.mixed_precision: auto`: bfloat16 where the hardware computes it natively.

bfloat16 pays only where the processor has bfloat16 arithmetic: x86 CPUs with
AVX512-BF16 or AMX (oneDNN's native bfloat16 convolutions), and GPUs of compute
capability 8.0 or more. Elsewhere TensorFlow emulates it, and a step is slower than
in float32 (0.25x on an Intel Xeon without AVX512-BF16, docs/BENCHMARKS.md), so
`auto` keeps float32 there.

`auto` is resolved once, when a run starts, and the concrete policy is what the
run's recipe.json records: a resumed run keeps the precision it started with, even
on a machine that would choose the other (its checkpoints were trained in it).
"""

import platform

import tensorflow as tf

from kgreedy.config.recipe import recipe_from_dict

AUTO = "auto"
BFLOAT16 = "mixed_bfloat16"
FLOAT32 = "none"
# /proc/cpuinfo flags of native bfloat16 arithmetic on x86.
_X86_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
_MIN_GPU_CAPABILITY = (8, 0)


def _cpu_flags():
    """The x86 feature flags of this machine's CPU (empty where unknown)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no way to ask without a native call
        pass
    return set()


def _gpu_capabilities():
    """(major, minor) compute capability of each visible GPU."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def native_bfloat16():
    """Whether this machine computes bfloat16 natively, and why.

    With GPUs, the GPUs decide (every one must be capable: they train in step);
    without, the CPU's flags do.

    Returns:
        (bool, reason): the reason names the feature found or missing.
    """
    gpus = _gpu_capabilities()
    if gpus:
        weakest = min(gpus)
        capable = weakest >= _MIN_GPU_CAPABILITY
        return capable, (f"{len(gpus)} GPU(s), lowest compute capability "
                         f"{weakest[0]}.{weakest[1]}"
                         + ("" if capable else ", under 8.0"))
    found = [name for flag, name in _X86_FLAGS.items() if flag in _cpu_flags()]
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, "this CPU has neither AVX512-BF16 nor AMX"


def choose(precision):
    """The concrete `train.mixed_precision` for `precision` on this machine.

    Returns:
        (precision, note): `note` says what `auto` chose and why, None when
        `precision` was not `auto`.
    """
    if precision != AUTO:
        return precision, None
    native, reason = native_bfloat16()
    chosen = BFLOAT16 if native else FLOAT32
    return chosen, f"auto chose {_word(chosen)} ({reason})"


def policy_name(precision):
    """The Keras mixed-precision policy of a `train.mixed_precision` value."""
    precision, _ = choose(precision)
    return "float32" if precision == FLOAT32 else precision


def resolve(recipe, saved=None):
    """The recipe with `auto` replaced by what this machine (or the run) uses.

    Args:
        recipe: a `Recipe`.
        saved: the `train.mixed_precision` of the run being resumed, or None.

    Returns:
        (recipe, note): note is a line for the progress output, or None when the
        recipe did not say `auto`.
    """
    if recipe.train.mixed_precision != AUTO:
        return recipe, None
    if saved is not None and saved != AUTO:
        chosen = saved
        note = f"auto: kept {_word(saved)}, the precision the run started with"
    else:
        chosen, note = choose(AUTO)
    raw = recipe.to_dict()
    raw["train"]["mixed_precision"] = chosen
    return recipe_from_dict(raw), f"precision: {note}"


def _word(precision):
    return {FLOAT32: "float32", BFLOAT16: "bfloat16"}.get(precision, precision)


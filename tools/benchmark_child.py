"""One measurement of tools/benchmark.py, in the fresh process it runs in.

    python tools/benchmark_child.py SPEC_JSON

tools/benchmark.py starts this file once per measurement, so that each figure's peak
RSS is its own and no measurement warms caches for the next. SPEC_JSON says what to
measure (`kind`: probe, kgreedy, minimal, cached, pipeline, end_to_end,
end_to_end_loop or decoupled; with `--memory` also end_to_end_eager, remat_MODE and
decoupled_buffer, tools/benchmark_memory.py), for which
`stage`, with the recipe (as a dict), `steps`, `repeats` and `warmup`, optionally the
`precision` (a `train.mixed_precision` value, `auto` included) to run the recipe in,
and the `result` file to write the figures to as JSON. The child resolves `auto` on
its own machine (kgreedy.training.precision) and reports what ran: `precision`,
`precision_note` and `keras_policy`. The child imports and builds everything, runs
the warm-up steps (the call that traces runs them), prints READY on stdout and waits
for a line on stdin: the parent times one child at a time while the others wait idle.
A bad recipe is one `kgreedy: error:` line on stderr and exit status 2, which the
parent passes on.
"""

import contextlib
import inspect
import json
import math
import resource
import statistics
import sys
import time

# No TensorFlow at module level: tools/benchmark.py imports the constants below, and
# must stay small (a child's ru_maxrss starts at its parent's RSS).
import benchmark_memory
from kgreedy import cli
from kgreedy.base.errors import DataError
from kgreedy.base.files import write_json
from kgreedy.base.machine import machine
from kgreedy.config.data_checks import check_against_data
from kgreedy.config.recipe import recipe_from_dict

CONV_PROBE = (64, 32, 32, 128, 128)  # batch, height, width, channels in, out; 3x3 kernel
MATMUL_PROBE = 2048
READY = "kgreedy-benchmark: ready"


def rss_mb():
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


WARM_PEAK = []  # peak RSS (MB) when the warm-up ended: growth after it is a leak


def gate():
    """Tells the parent this child is warmed up, then idles until it is its turn."""
    WARM_PEAK.append(rss_mb())
    print(READY, flush=True)
    if not sys.stdin.readline():
        raise SystemExit("benchmark: the parent went away")


def timed(run_steps, sync, spec, chunk):
    """Seconds of each timed repeat after the warm-up; steps go in chunks of `chunk`."""
    def go(n):
        while n > 0:
            run_steps(min(chunk, n))
            n -= min(chunk, n)
        sync()

    go(spec["warmup"])
    gate()
    seconds = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        go(spec["steps"])
        seconds.append(time.perf_counter() - start)
    return seconds


def input_shape(recipe):
    """(image_shape, num_classes, pipeline available, warnings) without reading pixels."""
    from kgreedy import data

    try:
        spec = data.describe(recipe.data)
    except DataError as e:
        size = recipe.data.image_size
        if size is None:
            raise
        shape, num_classes, available = (size, size, recipe.data.channels or 3), 10, False
        warnings = [f"{e}; measuring on synthetic {size}x{size} images, 10 classes"]
    else:
        shape, num_classes, warnings = spec.image_shape, spec.num_classes, []
        # describe() reads no pixels: a TFDS dataset is usable once it has split counts.
        available = recipe.data.source == "digits" or spec.num_train is not None
        if not available:
            warnings.append(f"{recipe.data.name} is not prepared in "
                            f"{recipe.data.data_dir or 'the default TFDS data_dir'}; no "
                            "pipeline figures (pass --set data.data_dir=DIR)")
    check_against_data(recipe, shape[0])
    return shape, num_classes, available, warnings


def shape_of(recipe, spec):
    """(image_shape, num_classes): the probe's when the parent passed them on."""
    if "image_shape" in spec:
        return tuple(spec["image_shape"]), spec["num_classes"]
    return input_shape(recipe)[:2]


def synthetic(tf, recipe, shape, num_classes):
    """Standard-normal images (the net normalises with mean 0 / std 1) and labels."""
    batch = recipe.train.batch_size
    x = tf.random.stateless_normal([batch, *shape], seed=[recipe.seed, 1])
    y = tf.random.stateless_uniform([batch], seed=[recipe.seed, 2], minval=0,
                                    maxval=num_classes, dtype=tf.int32)
    return x, y


def build_net(recipe, shape, num_classes, mean=None, std=None):
    from kgreedy.model.from_recipe import from_recipe

    return from_recipe(recipe, shape, num_classes, mean or [0.0] * shape[2],
                     std or [1.0] * shape[2])


def stage_flops(tf, net):
    """Per stage [prefix forward, module j + head j forward] FLOPs/image; end to end."""
    from kgreedy.model.flops import graph_flops

    rows, prefix, shape, head_f = [], 0, net.image_shape, 0
    for module, head, out in zip(net.modules, net.heads, net.stage_shapes):
        module_f, head_f = graph_flops(module, shape), graph_flops(head, out)
        rows.append([prefix, module_f + head_f])
        prefix, shape = prefix + module_f, out
    return rows, 3 * (prefix + head_f)  # every module and the last head, fwd + bwd


def machine_info(tf, keras):
    """`base.machine.machine` with the GPU's name and the library versions."""
    gpus = tf.config.list_physical_devices("GPU")
    gpu = gpus and tf.config.experimental.get_device_details(gpus[0]).get("device_name",
                                                                          gpus[0].name)
    return machine(gpu=gpu or None, tensorflow=tf.__version__, keras=keras.__version__)


def roofline(tf, repeats):
    """Median GFLOP/s of a large float32 conv (forward) and a large matmul."""
    n, h, w, cin, cout = CONV_PROBE
    # Arguments, not captured constants, so nothing is folded away at trace time.
    conv = tf.function(lambda x, k: tf.reduce_sum(tf.nn.conv2d(x, k, 1, "SAME")))
    probes = [("conv_gflops", conv,
               (tf.random.normal([n, h, w, cin]), tf.random.normal([3, 3, cin, cout])),
               2 * n * h * w * 9 * cin * cout),
              ("matmul_gflops", tf.function(lambda a: tf.reduce_sum(tf.matmul(a, a))),
               (tf.random.normal([MATMUL_PROBE] * 2),), 2 * MATMUL_PROBE ** 3)]
    for _, fn, inputs, _ in probes:
        fn(*inputs).numpy()  # trace and warm up before the gate
    gate()
    result = {}
    for key, fn, inputs, flops in probes:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs).numpy()
            seconds.append(time.perf_counter() - start)
        result[key] = flops / statistics.median(seconds) / 1e9
    return result


def probe(tf, recipe, spec):
    """What the parent needs once: shapes, FLOPs, the machine, the roofline."""
    import keras

    from kgreedy.training.stage import StageLoop

    shape, num_classes, available, warnings = input_shape(recipe)
    net = build_net(recipe, shape, num_classes)
    flops, e2e_flops = stage_flops(tf, net)
    # Names, not layers: a child makes the same net, so the same names, in the same
    # order (auto-named layers included), and only then knows its RematScope.
    names = benchmark_memory.inputs_only_layers([net.standardize, *net.modules,
                                                 net.heads[-1]])
    return {"image_shape": list(shape), "num_classes": num_classes, "remat_layer_names": names,
            "pipeline_available": available, "warnings": warnings,
            "cached_supported": "cached_features" in inspect.signature(StageLoop).parameters,
            "flops": flops, "end_to_end_flops": e2e_flops,
            "machine": {**machine_info(tf, keras), **roofline(tf, spec["repeats"])}}


def measure_stage_loop(tf, recipe, spec):
    """kgreedy's StageLoop step on an in-memory batch, cached features or the real pipeline."""
    run_steps, sync = stage_loop_steps(tf, recipe, spec)
    return timed(run_steps, sync, spec, recipe.train.steps_per_execution)


def stage_loop_steps(tf, recipe, spec):
    """(run_steps(n), sync()) of `measure_stage_loop`'s StageLoop (also
    tools/profile_ops.py's); `spec["kind"]` defaults to kgreedy's in-memory batch."""
    from kgreedy import data
    from kgreedy.training.stage import StageLoop

    strategy, j, kind = tf.distribute.get_strategy(), spec["stage"], spec.get("kind", "kgreedy")
    shape, num_classes = shape_of(recipe, spec)
    if kind == "pipeline":
        datasets = data.load(recipe.data, data.describe(recipe.data),
                             batch_size=recipe.train.batch_size, seed=recipe.seed)
        dataset = datasets.train_for(0, 0, None).repeat()  # the recipe's augmentation
        net = build_net(recipe, shape, num_classes, datasets.spec.mean, datasets.spec.std)
    else:
        net = build_net(recipe, shape, num_classes)
        x, y = synthetic(tf, recipe, shape, num_classes)
        if kind == "cached":
            x = net.features(x, j - 1, training=False)
        dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    extra = {"cached_features": True} if kind == "cached" else {}
    loop = StageLoop(net, j, recipe.train, strategy, steps_per_epoch=spec["steps"], **extra)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    return (lambda n: loop._train_steps(iterator, tf.constant(n)),
            lambda: float(loop.train_sums["count"].read_value()))


def measure_minimal(tf, recipe, spec):
    """The overhead floor: one tf.function with a tf.range loop and a GradientTape."""
    import keras

    from kgreedy.training.optim import l2_penalty, make_optimizer

    j, config = spec["stage"], recipe.train.optimizer
    shape, num_classes = shape_of(recipe, spec)
    net = build_net(recipe, shape, num_classes)
    net.set_trainable_stage(j)
    variables = net.stage_variables(j)
    optimizer = make_optimizer(config, config.learning_rate)
    scaling = getattr(recipe.train, "mixed_precision", "none") == "mixed_float16"
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer) if scaling else optimizer
    optimizer.build(variables)
    x, y = synthetic(tf, recipe, shape, num_classes)

    def gradients(features):
        with tf.GradientTape() as tape:
            logits = tf.cast(net.stage_logits(features, j, training=True), tf.float32)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            penalty = l2_penalty(config, variables)
            loss = loss if penalty is None else loss + penalty
            scaled = optimizer.scale_loss(loss) if scaling else loss
        return tape.gradient(scaled, variables), loss

    if getattr(recipe.train, "jit_compile", False):  # XLA on the same part as kgreedy
        gradients = tf.function(gradients, jit_compile=True)

    @tf.function
    def train_steps(n):
        loss = tf.constant(0.0)
        for _ in tf.range(n):
            grads, loss = gradients(net.features(x, j - 1, training=False))
            optimizer.apply_gradients(zip(grads, variables))
        return loss

    last = [None]  # the newest call's loss: reading it waits for the device
    return timed(lambda n: last.__setitem__(0, train_steps(tf.constant(n))),
                 lambda: float(last[0]), spec, recipe.train.steps_per_execution)


def measure_end_to_end(tf, recipe, spec):
    """Keras compile + fit of every module and the last head, all trainable.

    Built from the layers, not `deployed_model()`, whose call pins BN to inference
    mode. No L2 term: Keras' SGD has decoupled decay only, and the term costs little.
    `end_to_end_eager` fits with `run_eagerly=True`; `remat_MODE` makes the net under
    `keras.RematScope(MODE)` (tools/benchmark_memory.py), eagerly where the mode
    cannot be traced. Returns the repeats' seconds and what to record once the peak
    is read (the remat check).
    """
    import keras

    from kgreedy.training.optim import make_optimizer

    shape, num_classes = shape_of(recipe, spec)
    kind = spec["kind"]
    mode = kind.removeprefix("remat_") if kind.startswith("remat_") else None
    eager = kind == "end_to_end_eager" or mode in benchmark_memory.EAGER_MODES
    names = spec.get("remat_layer_names", [])
    # The scope must be active where the layers are made: Keras reads it then.
    with (benchmark_memory.remat_scope(keras, mode, names) if mode
          else contextlib.nullcontext()):
        net = build_net(recipe, shape, num_classes)
        net.set_trainable_stage(net.num_stages, end_to_end=True)
        inputs = keras.Input(shape)
        x = net.standardize(inputs)
        for module in net.modules:
            x = module(x)
        model = keras.Model(inputs, net.heads[-1](x))
    steps, warmup, repeats = spec["steps"], spec["warmup"], spec["repeats"]
    per_call = math.gcd(min(recipe.train.steps_per_execution, steps), steps, warmup)
    model.compile(optimizer=make_optimizer(recipe.train.optimizer,
                                           recipe.train.optimizer.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=per_call, run_eagerly=eager,
                  jit_compile=not eager and getattr(recipe.train, "jit_compile", False))
    marks, stamps, done = {warmup + r * steps for r in range(repeats + 1)}, [], [0]

    def on_batch_end(batch, logs):
        done[0] += per_call
        if done[0] in marks:
            float(logs["loss"])  # waits for the device
            if done[0] == warmup:
                gate()
            stamps.append(time.perf_counter())

    model.fit(tf.data.Dataset.from_tensors(synthetic(tf, recipe, shape, num_classes)).repeat(),
              epochs=1, steps_per_epoch=warmup + repeats * steps, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)])
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    if mode is None:
        return seconds, {"run_eagerly": eager}
    return seconds, {"run_eagerly": eager, "remat": lambda: benchmark_memory.remat_check(
        tf, model, mode, names, shape)}


def measure_whole_net(tf, recipe, spec):
    """Every module at once through kgreedy's own loops, on an in-memory batch:
    `decoupled` (DecoupledLoop: each module on its own head, no gradient between
    modules, `train.decoupled.buffer_size` as the recipe says) or
    `end_to_end_loop` (StageLoop end to end: every module with the last head)."""
    from kgreedy.training.decoupled import DecoupledLoop
    from kgreedy.training.stage import StageLoop

    strategy = tf.distribute.get_strategy()
    shape, num_classes = shape_of(recipe, spec)
    net = build_net(recipe, shape, num_classes)
    if spec["kind"] in ("decoupled", "decoupled_buffer"):
        loop = DecoupledLoop(net, recipe.train, strategy, steps_per_epoch=spec["steps"],
                             seed=recipe.seed)
    else:
        loop = StageLoop(net, net.num_stages, recipe.train, strategy,
                         steps_per_epoch=spec["steps"], end_to_end=True)
    dataset = tf.data.Dataset.from_tensors(synthetic(tf, recipe, shape, num_classes))
    iterator = iter(strategy.experimental_distribute_dataset(dataset.repeat()))
    seconds = timed(lambda n: loop._train_steps(iterator, tf.constant(n)),
                    lambda: loop.train_sums["count"].read_value().numpy(), spec,
                    recipe.train.steps_per_execution)
    # What the replay buffers really hold (none without one): part of the peak.
    buffers = getattr(loop, "buffers", None) or []
    return seconds, {"replay_buffers": len(buffers),
                     "replay_buffer_entries": [int(b.size) for b in buffers],
                     "replay_buffer_mb": sum(v.shape.num_elements() * v.dtype.size
                                             for b in buffers
                                             for v in (b.features, b.labels, b.images)
                                             if v is not None) / 2 ** 20}


def figures(seconds, images, baseline):
    """What every child reports of its timed repeats (`images` each) and its memory
    above the `baseline` RSS, read now."""
    peak = rss_mb()
    return {"images_per_second": statistics.median([images / s for s in seconds]),
            "repeat_seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "peak_above_baseline_mb": peak - baseline,
            "warmup_peak_above_baseline_mb": WARM_PEAK[0] - baseline if WARM_PEAK else None}


def with_precision(raw, precision=None):
    """The recipe of `raw` (a dict) in `precision` (default: its own), `auto` resolved
    for this machine, as a run would resolve it.

    Returns:
        (recipe, note): `note` says what `auto` chose, None when it was not asked for.
    """
    from kgreedy.training.precision import resolve

    if precision is not None:
        raw = {**raw, "train": {**raw.get("train", {}), "mixed_precision": precision}}
    recipe, note = resolve(recipe_from_dict(raw))
    # resolve's note is a progress line ("precision: auto chose ..."); keep the fact.
    return recipe, note and note.removeprefix("precision: ")


MEASURES = {"kgreedy": measure_stage_loop, "cached": measure_stage_loop,
            "pipeline": measure_stage_loop, "minimal": measure_minimal,
            "end_to_end": measure_end_to_end, "decoupled": measure_whole_net,
            "end_to_end_loop": measure_whole_net, "end_to_end_eager": measure_end_to_end,
            "decoupled_buffer": measure_whole_net,
            **{f"remat_{m}": measure_end_to_end for m in benchmark_memory.REMAT_MODES}}


def with_buffer(raw, size):
    """The raw recipe of a `decoupled_buffer` row: decoupled, with a replay buffer of
    `size` entries (the recipe refuses a buffer in any other mode)."""
    train = raw.get("train", {})
    return {**raw, "train": {**train, "mode": "decoupled",
                             "decoupled": {**train.get("decoupled", {}),
                                           "buffer_size": size}}}


def child_main(spec):
    """One measurement; writes its figures to spec['result'] as JSON."""
    import keras
    import tensorflow as tf

    import kgreedy.data  # noqa: F401  (part of the import baseline)
    import kgreedy.model.network  # noqa: F401
    import kgreedy.training.decoupled  # noqa: F401
    import kgreedy.training.stage  # noqa: F401
    from kgreedy.training import precision

    # On demand, so a waiting child holds only what it used and the peak is its own.
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    baseline = rss_mb()
    raw = spec["recipe"]
    if spec["kind"] == "decoupled_buffer":
        raw = with_buffer(raw, spec["buffer_size"])
    recipe, note = with_precision(raw, spec.get("precision"))
    keras.mixed_precision.set_global_policy(precision.policy_name(recipe.train.mixed_precision))
    if spec["kind"] == "probe":
        write_json(spec["result"], probe(tf, recipe, spec))
        return cli.EXIT_OK
    seconds = MEASURES[spec["kind"]](tf, recipe, spec)
    # A measurement may add figures, some found only after its peak is read.
    seconds, extra = seconds if isinstance(seconds, tuple) else (seconds, {})
    gpu_peak = None
    if tf.config.list_physical_devices("GPU"):
        gpu_peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20
    write_json(spec["result"], {
        **figures(seconds, recipe.train.batch_size * spec["steps"], baseline),
        "gpu_peak_mb": gpu_peak,
        "precision": recipe.train.mixed_precision, "precision_note": note,
        "keras_policy": keras.mixed_precision.global_policy().name,
        **{key: value() if callable(value) else value for key, value in extra.items()}})
    return cli.EXIT_OK


def main(argv=None):
    """`python tools/benchmark_child.py SPEC_JSON`; started by tools/benchmark.py."""
    parser = cli.ArgumentParser(
        prog="python tools/benchmark_child.py",
        description="One measurement of tools/benchmark.py in this fresh process "
                    "(started by it; not meant to be run by hand).")
    parser.add_argument("spec", metavar="SPEC_JSON", help="what to measure, as JSON")
    return child_main(json.loads(parser.parse_args(argv).spec))


if __name__ == "__main__":
    sys.exit(cli.run(main))

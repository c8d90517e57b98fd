"""Throughput, FLOP efficiency and memory of kgreedy's stage step (DESIGN.md section 8).

    python tools/benchmark.py RECIPE [--stages 1,3] [--batch-size N] [--steps N]
        [--repeats N] [--warmup N] [--set KEY=VALUE ...] [--json OUT]

    python tools/benchmark.py recipes/cifar10_k2.json --set data.data_dir=../shared/tfds \
        --json out.json

For every stage j, side by side: `kgreedy` (StageLoop's traced step on one in-memory
synthetic batch), `minimal` (a hand-written tf.function + GradientTape loop doing the
same math: the overhead floor), `cached` (StageLoop fed the output of blocks 1..j-1, when
StageLoop takes `cached_features`) and `pipeline` (StageLoop fed by the real tf.data
pipeline, when the data is there). Once per run: Keras `fit` of the deployed network end
to end, and a roofline probe (a large conv and a large matmul).

Everything runs on one device (the default strategy; `distribute.*` is ignored). Every
measurement runs in a fresh child process, so its peak RSS is its own. Children start
two at a time and prepare (import, build, trace, warm up) side by side, then are timed
one after the other while the rest wait idle. The figure is the median images/s over
`--repeats` repeats of `--steps` steps after `--warmup` untimed steps. The terminal gets
one table row per stage; `--json` writes DESIGN.md section 8's object (plus ratios and
each child's raw figures). Progress goes to stderr.
Exit status: 0 done; 1 a measurement failed (its figures are null); 2 bad usage or recipe.
"""

import argparse
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# No TensorFlow here: the parent stays small, because a child's ru_maxrss starts at
# its parent's RSS (Linux carries the high-water mark across fork and exec).
from kgreedy import cli
from kgreedy.base.errors import DataError, KgreedyError
from kgreedy.base.files import write_json
from kgreedy.config.recipe import check_against_data, load_recipe, recipe_from_dict

FLOPS_NOTE = ("needed work per image: forward of the frozen blocks 1..j-1 + 3x the forward "
              "of block j and head j (forward+backward); end to end: 3x the forward of "
              "every block and the last head; Conv2D and Dense (MatMul) ops only "
              "(2*Hout*Wout*kh*kw*Cin*Cout, 2*in*out), psi, pooling, BN and ReLU ignored. "
              "An upper bound: "
              "nothing needs the gradient of block j's input, so its conv costs 2x, not 3x")
CONV_PROBE = (64, 32, 32, 128, 128)  # batch, height, width, channels in, out; 3x3 kernel
MATMUL_PROBE = 2048
READY = "kgreedy-benchmark: ready"
PARALLEL = 2  # children preparing at once
KINDS = ("kgreedy", "minimal", "cached", "pipeline")


def log(message):
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------- command line ----

def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; received {text!r}")
    return int(text)


def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python tools/benchmark.py",
        description="Images/s, GFLOP/s and peak memory of kgreedy's stage step against a "
                    "minimal loop, the input pipeline and Keras fit end to end.")
    parser.add_argument("recipe", nargs="?", help="recipe JSON file")
    parser.add_argument("--stages", help="comma-separated stages to measure (default: all)")
    parser.add_argument("--batch-size", type=positive_int, help="default: train.batch_size")
    parser.add_argument("--steps", type=positive_int, default=4, help="steps per repeat")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats")
    parser.add_argument("--warmup", type=positive_int, default=1,
                        help="untimed steps first: the call that traces runs them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key by dotted path (repeatable)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and args.recipe is None:
        parser.error("the following arguments are required: recipe")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise KgreedyError("--json", "its directory does not exist", args.json)
    return args


def parse_stages(text, num_stages):
    """`1,3` -> [1, 3]; every stage must exist in the recipe."""
    if text is None:
        return list(range(1, num_stages + 1))
    parts = text.split(",")
    if not all(p.strip().isdigit() and 1 <= int(p) <= num_stages for p in parts):
        raise KgreedyError("--stages", f"expected comma-separated stages in 1..{num_stages}",
                           text)
    return sorted({int(p) for p in parts})


# ------------------------------------------------------ parent: children ----

class Child:
    """One measurement in a fresh interpreter: prepares, says ready, waits for go."""

    def __init__(self, job, base, label):
        self.job, self.label, self.start = job, label, time.perf_counter()
        self.tmp = tempfile.TemporaryDirectory(prefix="kgreedy-bench-")
        self.result_path = os.path.join(self.tmp.name, "result.json")
        spec = {**base, "kind": job[0], "stage": job[1], "result": self.result_path}
        self.stderr = open(os.path.join(self.tmp.name, "stderr"), "w+", encoding="utf-8")
        log(f"{label}: preparing")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.error = None

    def wait_ready(self):
        """Blocks until the child is warmed up and idle (or has died)."""
        for line in self.proc.stdout:
            if line.strip() == READY:
                return

    def finish(self):
        """Lets the child time its repeats; its result dict, or None if it failed."""
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died while preparing; its stderr says why
        self.proc.wait()
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        self.stderr.close()
        result = None
        if self.proc.returncode == 0 and os.path.exists(self.result_path):
            with open(self.result_path, encoding="utf-8") as f:
                result = json.load(f)
        self.tmp.cleanup()
        seconds = time.perf_counter() - self.start
        if result is None:
            usage = [line for line in lines if line.startswith("kgreedy: error: ")]
            self.error = usage[-1] if usage else (lines[-1] if lines else "no output")
            log(f"{self.label}: failed (exit {self.proc.returncode}) after {seconds:.1f} s: "
                f"{self.error}")
        elif self.job[0] == "probe":
            m = result["machine"]
            log(f"{self.label}: roofline conv {m['conv_gflops']:,.1f} GFLOP/s, matmul "
                f"{m['matmul_gflops']:,.1f} GFLOP/s, {seconds:.1f} s since start")
            for warning in result["warnings"]:
                log(f"warning: {warning}")
        else:
            log(f"{self.label}: {result['images_per_second']:,.1f} images/s, peak "
                f"{result['peak_above_baseline_mb']:,.0f} MB above baseline, "
                f"{seconds:.1f} s since start")
        return result


def run_jobs(jobs, base):
    """Runs each job in its own child, PARALLEL preparing at once, timed one by one.

    Returns:
        {(kind, stage): result or None}; stops after the probe if the probe failed.
    """
    results, queue, done = {}, list(jobs), 0
    while queue:
        batch, queue = queue[:PARALLEL], queue[PARALLEL:]
        total = done + len(batch) + len(queue)
        children = [Child((kind, j), base, f"[{done + i}/{total}] " + (
            kind.replace("_", "-") if j is None else f"stage {j} {kind}"))
            for i, (kind, j) in enumerate(batch, start=1)]
        for child in children:
            child.wait_ready()
        # A warmed-up pipeline child keeps filling its prefetch buffers: time it first,
        # so it never runs beside another child's timed steps.
        for child in sorted(children, key=lambda c: c.job[0] != "pipeline"):
            results[child.job] = child.finish()
        done += len(batch)
        probe = results.get(("probe", None), False)
        if probe is None:
            error = children[0].error
            if error.startswith("kgreedy: error: "):  # the recipe does not fit the data
                cli.fail(error[len("kgreedy: error: "):])
            return results
        if probe:  # drop what the probe found impossible; pass on what it found
            skip = {"cached": not probe["cached_supported"],
                    "pipeline": not probe["pipeline_available"]}
            queue = [job for job in queue if not skip.get(job[0])]
            base = {**base, "image_shape": probe["image_shape"],
                    "num_classes": probe["num_classes"]}
    return results


def plan(stages):
    """The jobs in run order: the probe, each stage's measurements, then end to end."""
    jobs = [("probe", None)]
    for j in stages:
        jobs += [(k, j) for k in KINDS if k != "cached" or j >= 2]
    return jobs + [("end_to_end", None)]


# -------------------------------------------------------- parent: report ----

def ratio(a, b):
    return a / b if a is not None and b else None


def stage_row(j, probe, runs, e2e_peak):
    """One stage's figures: DESIGN.md section 8's keys first, then extras."""
    prefix, own = probe["flops"][j - 1]
    gflop = (prefix + 3 * own) / 1e9
    ips = {k: (runs.get((k, j)) or {}).get("images_per_second") for k in KINDS}
    main = runs.get(("kgreedy", j)) or {}
    above = main.get("peak_above_baseline_mb")
    return {
        "stage": j,
        "kgreedy_images_per_second": ips["kgreedy"],
        "minimal_images_per_second": ips["minimal"],
        "pipeline_images_per_second": ips["pipeline"],
        "cached_images_per_second": ips["cached"],
        "gflop_per_image": gflop,
        "achieved_gflops": ips["kgreedy"] and gflop * ips["kgreedy"],
        "peak_rss_mb": main.get("peak_rss_mb"),
        "minimal_achieved_gflops": ips["minimal"] and gflop * ips["minimal"],
        "prefix_gflop_per_image": prefix / 1e9,
        "stage_forward_gflop_per_image": own / 1e9,
        "peak_above_baseline_mb": above,
        "gpu_peak_mb": main.get("gpu_peak_mb"),
        "kgreedy_over_minimal": ratio(ips["kgreedy"], ips["minimal"]),
        "cached_over_kgreedy": ratio(ips["cached"], ips["kgreedy"]),
        "pipeline_over_kgreedy": ratio(ips["pipeline"], ips["kgreedy"]),
        "peak_over_end_to_end": ratio(above, e2e_peak),
        "runs": {k: runs.get((k, j)) for k in KINDS},
    }


def assemble(recipe, args, stages, runs):
    """The JSON report (DESIGN.md section 8, plus ratios and each child's raw figures)."""
    probe = runs[("probe", None)]
    e2e = runs.get(("end_to_end", None)) or {}
    rows = [stage_row(j, probe, runs, e2e.get("peak_above_baseline_mb")) for j in stages]
    e2e_ips, e2e_gflop = e2e.get("images_per_second"), probe["end_to_end_flops"] / 1e9
    last = rows[-1] if stages[-1] == len(recipe.model.blocks) else {}
    baselines = [r["baseline_rss_mb"] for k, r in runs.items() if r and k[0] != "probe"]
    return {
        "machine": probe["machine"], "recipe": recipe.name,
        "batch_size": recipe.train.batch_size,
        "end_to_end": {"images_per_second": e2e_ips, "peak_rss_mb": e2e.get("peak_rss_mb"),
                       "peak_above_baseline_mb": e2e.get("peak_above_baseline_mb"),
                       "gpu_peak_mb": e2e.get("gpu_peak_mb"), "gflop_per_image": e2e_gflop,
                       "achieved_gflops": e2e_ips and e2e_gflop * e2e_ips,
                       "last_stage_kgreedy_over_end_to_end":
                           ratio(last.get("kgreedy_images_per_second"), e2e_ips),
                       "run": e2e or None},
        "import_baseline_rss_mb": statistics.median(baselines) if baselines else None,
        "stages": rows,
        "steps": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup,
        "image_shape": probe["image_shape"], "num_classes": probe["num_classes"],
        "flops_note": FLOPS_NOTE, "warnings": probe["warnings"],
    }


def fmt(value, spec=",.1f"):
    return "-" if value is None else format(value, spec)


def print_report(report):
    e2e, m = report["end_to_end"], report["machine"]
    print(f"recipe {report['recipe']}: batch {report['batch_size']}, images/s = median of "
          f"{report['repeats']} x {report['steps']} steps after {report['warmup_steps']} "
          "warm-up steps")
    print(f"{'stage':>5} {'kgreedy':>9} {'minimal':>9} {'ratio':>6} {'cached':>9} "
          f"{'ratio':>6} {'pipeline':>9} {'ratio':>6} {'GFLOP/img':>10} {'GFLOP/s':>8} "
          f"{'peak MB':>8} {'/e2e':>5}")
    for s in report["stages"]:
        cells = [(s["kgreedy_images_per_second"], ",.1f", 9),
                 (s["minimal_images_per_second"], ",.1f", 9),
                 (s["kgreedy_over_minimal"], ".2f", 6),
                 (s["cached_images_per_second"], ",.1f", 9),
                 (s["cached_over_kgreedy"], ".2f", 6),
                 (s["pipeline_images_per_second"], ",.1f", 9),
                 (s["pipeline_over_kgreedy"], ".2f", 6), (s["gflop_per_image"], ".3f", 10),
                 (s["achieved_gflops"], ",.1f", 8), (s["peak_above_baseline_mb"], ",.0f", 8),
                 (s["peak_over_end_to_end"], ".2f", 5)]
        print(f"{s['stage']:>5} " + " ".join(f"{fmt(v, f):>{w}}" for v, f, w in cells))
    print("ratios: kgreedy/minimal, cached/kgreedy, pipeline/kgreedy; GFLOP/s: kgreedy's; "
          "peak MB: kgreedy's peak RSS above the import baseline "
          f"({fmt(report['import_baseline_rss_mb'], ',.0f')} MB); /e2e: that over end to end's")
    print(f"end-to-end fit: {fmt(e2e['images_per_second'])} images/s, "
          f"{e2e['gflop_per_image']:.3f} GFLOP/img, {fmt(e2e['achieved_gflops'])} GFLOP/s, "
          f"peak {fmt(e2e['peak_above_baseline_mb'], ',.0f')} MB above baseline; last stage "
          f"kgreedy/end-to-end {fmt(e2e['last_stage_kgreedy_over_end_to_end'], '.2f')}")
    n, h, w, cin, cout = CONV_PROBE
    print(f"roofline: conv3x3 {n}x{h}x{w}x{cin}->{cout} forward {m['conv_gflops']:,.1f} "
          f"GFLOP/s; matmul {MATMUL_PROBE}x{MATMUL_PROBE} {m['matmul_gflops']:,.1f} GFLOP/s")
    print(f"machine: {m['cpu']}, {m['cores']} logical cores, GPU {m['gpu'] or 'none'}, "
          f"TensorFlow {m['tensorflow']}, Keras {m['keras']}")
    print(f"FLOPs: {report['flops_note']}")


def main(argv=None):
    args = parse_args(argv)
    if args.child is not None:
        return child_main(json.loads(args.child))
    overrides = args.set + ([f"train.batch_size={args.batch_size}"] if args.batch_size else [])
    recipe = load_recipe(args.recipe, overrides)
    stages = parse_stages(args.stages, len(recipe.model.blocks))
    base = {"recipe": recipe.to_dict(), "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup}
    runs = run_jobs(plan(stages), base)
    if runs[("probe", None)] is None:
        return cli.EXIT_FAILURE
    report = assemble(recipe, args, stages, runs)
    print_report(report)
    if args.json:
        write_json(args.json, report)
    return cli.EXIT_OK if all(runs.values()) else cli.EXIT_FAILURE


# ------------------------------------------------------------------- child ----

def rss_mb():
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gate():
    """Tells the parent this child is warmed up, then idles until it is its turn."""
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


def graph_flops(tf, layer, shape):
    """FLOPs of `layer` on one image of `shape`, from the Conv2D and MatMul ops' shapes
    in its traced graph (2*Hout*Wout*kh*kw*Cin*Cout, 2*m*k*n); whatever the head kind."""
    fn = tf.function(lambda x: layer(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec([1, *shape], tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            kh, kw, cin, cout = op.inputs[1].shape
            out = op.outputs[0].shape
            h, w = (out[2], out[3]) if op.get_attr("data_format") == b"NCHW" else out[1:3]
            total += 2 * h * w * kh * kw * cin * cout
        elif op.type == "MatMul":
            a, b = op.inputs[0].shape, op.inputs[1].shape
            m, k = (a[1], a[0]) if op.get_attr("transpose_a") else (a[0], a[1])
            total += 2 * m * k * (b[0] if op.get_attr("transpose_b") else b[1])
    return total


def stage_flops(tf, net):
    """Per stage [prefix forward, block j + head j forward] FLOPs/image; end to end."""
    rows, prefix, shape, head_f = [], 0, net.image_shape, 0
    for block, head, out in zip(net.blocks, net.heads, net.stage_shapes):
        block_f, head_f = graph_flops(tf, block, shape), graph_flops(tf, head, out)
        rows.append([prefix, block_f + head_f])
        prefix, shape = prefix + block_f, out
    return rows, 3 * (prefix + head_f)  # every block and the last head, fwd + bwd


def machine_info(tf, keras):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    gpus = tf.config.list_physical_devices("GPU")
    gpu = gpus and tf.config.experimental.get_device_details(gpus[0]).get("device_name",
                                                                          gpus[0].name)
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu or None,
            "tensorflow": tf.__version__, "keras": keras.__version__}


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
    flops, e2e_flops = stage_flops(tf, build_net(recipe, shape, num_classes))
    return {"image_shape": list(shape), "num_classes": num_classes,
            "pipeline_available": available, "warnings": warnings,
            "cached_supported": "cached_features" in inspect.signature(StageLoop).parameters,
            "flops": flops, "end_to_end_flops": e2e_flops,
            "machine": {**machine_info(tf, keras), **roofline(tf, spec["repeats"])}}


def measure_stage_loop(tf, recipe, spec):
    """kgreedy's StageLoop step on an in-memory batch, cached features or the real pipeline."""
    from kgreedy import data
    from kgreedy.training.stage import StageLoop

    strategy, j, kind = tf.distribute.get_strategy(), spec["stage"], spec["kind"]
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
    return timed(lambda n: loop._train_steps(iterator, tf.constant(n)),
                 lambda: float(loop.sums["count"].read_value()), spec,
                 recipe.train.steps_per_execution)


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
    """Keras compile + fit of every block and the last head, all trainable.

    Built from the layers, not `deployed_model()`, whose call pins BN to inference
    mode. No L2 term: Keras' SGD has decoupled decay only, and the term costs little.
    """
    import keras

    from kgreedy.training.optim import make_optimizer

    shape, num_classes = shape_of(recipe, spec)
    net = build_net(recipe, shape, num_classes)
    net.set_trainable_stage(net.num_stages, end_to_end=True)
    inputs = keras.Input(shape)
    x = net.standardize(inputs)
    for block in net.blocks:
        x = block(x)
    model = keras.Model(inputs, net.heads[-1](x))
    steps, warmup, repeats = spec["steps"], spec["warmup"], spec["repeats"]
    per_call = math.gcd(min(recipe.train.steps_per_execution, steps), steps, warmup)
    model.compile(optimizer=make_optimizer(recipe.train.optimizer,
                                           recipe.train.optimizer.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=per_call,
                  jit_compile=getattr(recipe.train, "jit_compile", False))
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
    return [b - a for a, b in zip(stamps, stamps[1:])]


MEASURES = {"kgreedy": measure_stage_loop, "cached": measure_stage_loop,
            "pipeline": measure_stage_loop, "minimal": measure_minimal,
            "end_to_end": measure_end_to_end}


def child_main(spec):
    """One measurement; writes its figures to spec['result'] as JSON."""
    import keras
    import tensorflow as tf

    import kgreedy.data  # noqa: F401  (part of the import baseline)
    import kgreedy.model.network  # noqa: F401
    import kgreedy.training.stage  # noqa: F401

    # On demand, so a waiting child holds only what it used and the peak is its own.
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    baseline = rss_mb()
    recipe = recipe_from_dict(spec["recipe"])
    precision = getattr(recipe.train, "mixed_precision", "none")
    keras.mixed_precision.set_global_policy("float32" if precision == "none" else precision)
    if spec["kind"] == "probe":
        write_json(spec["result"], probe(tf, recipe, spec))
        return cli.EXIT_OK
    seconds = MEASURES[spec["kind"]](tf, recipe, spec)
    gpu_peak = None
    if tf.config.list_physical_devices("GPU"):
        gpu_peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20
    peak, images = rss_mb(), recipe.train.batch_size * spec["steps"]
    write_json(spec["result"], {
        "images_per_second": statistics.median([images / s for s in seconds]),
        "repeat_seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
        "peak_above_baseline_mb": peak - baseline, "gpu_peak_mb": gpu_peak})
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))

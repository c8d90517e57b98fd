"""Where a stage step's time goes, per op, in kgreedy and in the PyTorch reference
(issue 30).

    python tools/profile_ops.py RECIPE [--stages 1,4] [--steps N]
        [--frameworks tensorflow,torch] [--set KEY=VALUE ...] [--json OUT]

    ONEDNN_MAX_CPU_ISA=AVX2 python tools/profile_ops.py recipes/cifar10_k2.json \
        --stages 1,4 --set train.mixed_precision=none

For each framework and stage, in a fresh process: build the stage (kgreedy's StageLoop
on one synthetic batch, as tools/benchmark.py's `kgreedy` row; tools/benchmark_torch.py's
reference), run `--steps` untimed steps, then profile `--steps` more (TensorFlow's
profiler, read from its XSpace; `torch.profiler`). Each op's time is its own (self)
time, summed per category: conv forward, conv backward (TensorFlow splits input and
filter; PyTorch's one op does both), batch norm, pooling, psi and layout copies,
activation, dense and loss, optimizer update and L2, other. Milliseconds per step, with
the step's wall time beside them; TensorFlow may run two ops at once, so its sum can
exceed the wall time. Then each framework's costliest ops. The environment goes to the
children: cap oneDNN with ONEDNN_MAX_CPU_ISA (and PyTorch's own kernels with
ATEN_CPU_CAPABILITY) to see another machine's path.
"""

import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import benchmark_child
import benchmark_torch
from benchmark import parse_stages
from kgreedy import cli
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import write_json
from kgreedy.config.recipe import load_recipe, recipe_from_dict

FRAMEWORKS = ("tensorflow", "torch")
CATEGORIES = ("conv forward", "conv backward (input)", "conv backward (filter)",
              "conv backward", "batch norm", "pooling", "psi and layout copies",
              "activation", "dense and loss", "optimizer update and L2", "other")
# (category, pattern on "name:OpType" for TensorFlow, on the aten op for PyTorch);
# the first match wins.
RULES = {
    "tensorflow": [
        ("conv backward (input)", r"Conv2DBackpropInput"),
        ("conv backward (filter)", r"Conv2DBackpropFilter"),
        ("conv forward", r":\w*Conv2D\w*$"),
        ("batch norm", r"(/bn\w*/|batchnorm|moments|BatchNorm)"),
        ("pooling", r"(/pool\w*/|/reduce\w*/|Pool)"),
        ("psi and layout copies", r"(/psi\w*/|SpaceToDepth|DepthToSpace|Transpose|ToTf)"),
        ("activation", r":(Relu|ReluGrad)$"),
        ("dense and loss", r"(/dense\w*/|MatMul|Softmax|BiasAdd)"),
        ("optimizer update and L2",
         r"(/sgd/|/optimizer/|:Square$|Assign\w*Variable|ResourceApply)"),
    ],
    "torch": [
        ("conv backward", r"convolution_backward"),
        ("conv forward", r"(mkldnn_convolution|^aten::_?convolution$|conv2d)"),
        ("batch norm", r"batch_norm"),
        ("pooling", r"pool"),
        ("psi and layout copies", r"(copy_|clone|permute|contiguous|reshape)"),
        ("activation", r"(relu|clamp_min|threshold)"),
        ("dense and loss", r"(addmm|aten::mm$|linear|softmax|nll_loss|cross_entropy)"),
        ("optimizer update and L2", r"(Optimizer\.|_foreach|AccumulateGrad)"),
    ],
}


def category(framework, name):
    return next((c for c, pattern in RULES[framework] if re.search(pattern, name)), "other")


def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python tools/profile_ops.py",
        description="Per-op time of a stage step in kgreedy and in the PyTorch reference.")
    parser.add_argument("recipe", help="recipe JSON file (plain blocks, for PyTorch)")
    parser.add_argument("--stages", help="comma-separated stages (default: all)")
    parser.add_argument("--steps", type=cli.positive_int, default=4,
                        help="steps to warm up, then steps to profile")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help="comma-separated, of tensorflow and torch (default: both)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key by dotted path (repeatable)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    frameworks = [f.strip() for f in args.frameworks.split(",")]
    if not frameworks or not set(frameworks) <= set(FRAMEWORKS) or len(set(frameworks)) < len(
            frameworks):
        raise KgreedyError("--frameworks", "expected distinct, comma-separated values of "
                           f"{', '.join(FRAMEWORKS)}", args.frameworks)
    args.frameworks = frameworks
    return args


# ---------------------------------------------------------------- children ----

def profile_tensorflow(spec, logdir):
    """kgreedy's traced stage step under TensorFlow's profiler: {op: ms}, wall ms."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    run_steps, sync = benchmark_child.stage_loop_steps(tf, recipe_from_dict(spec["recipe"]),
                                                      spec)

    def run():
        run_steps(spec["steps"])
        sync()

    run()
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0],
              "rb") as f:
        space.ParseFromString(f.read())
    ops = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Kernels are "scope/name:OpType"; executor and tf.data events have "::".
                if re.fullmatch(r"[^:\s]+:\w+", name):
                    ops[name] += event.duration_ps / 1e9
    return ops, wall * 1e3


def profile_torch(spec):
    """The PyTorch reference's step under torch.profiler: {op: self ms}, wall ms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run_steps, _ = benchmark_torch.stage_steps(torch, spec)
    run_steps(spec["steps"])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_steps(spec["steps"])
        wall = time.perf_counter() - start
    return ({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}, wall * 1e3)


def child_main(spec):
    with tempfile.TemporaryDirectory(prefix="kgreedy-profile-") as logdir:
        ops, wall = (profile_tensorflow(spec, logdir) if spec["framework"] == "tensorflow"
                     else profile_torch(spec))
    steps = spec["steps"]
    write_json(spec["result"], {"wall_ms_per_step": wall / steps,
                                "ops_ms_per_step": {k: v / steps for k, v in ops.items()}})
    return cli.EXIT_OK


# ------------------------------------------------------------------ parent ----

def run_child(spec):
    with tempfile.TemporaryDirectory(prefix="kgreedy-profile-") as tmp:
        spec = {**spec, "result": os.path.join(tmp, "result.json")}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                               json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(spec["result"]):
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            raise KgreedyError(spec["framework"], "the profile failed",
                               lines[-1] if lines else proc.returncode)
        with open(spec["result"], encoding="utf-8") as f:
            return json.load(f)


def summarise(framework, result):
    """{category: ms per step}, the costliest ops, the wall time."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms in result["ops_ms_per_step"].items():
        totals[category(framework, name)] += ms
    top = sorted(result["ops_ms_per_step"].items(), key=lambda kv: -kv[1])[:10]
    return {"wall_ms_per_step": result["wall_ms_per_step"], "categories": totals,
            "top_ops": [{"op": name, "ms_per_step": ms, "category": category(framework, name)}
                        for name, ms in top]}


def print_stage(stage, figures):
    names = list(figures)
    print(f"stage {stage}: ms per step (own time per op)")
    print(f"{'category':<26}" + "".join(f"{n:>12}" for n in names))
    for c in CATEGORIES:
        values = [figures[n]["categories"][c] for n in names]
        if any(v >= 0.05 for v in values):
            print(f"{c:<26}" + "".join(f"{v:>12.1f}" for v in values))
    print(f"{'sum of ops':<26}" + "".join(
        f"{sum(figures[n]['categories'].values()):>12.1f}" for n in names))
    print(f"{'wall':<26}" + "".join(f"{figures[n]['wall_ms_per_step']:>12.1f}" for n in names))
    for n in names:
        for op in figures[n]["top_ops"][:6]:
            print(f"  {n} {op['ms_per_step']:8.1f} ms  {op['category']:<24} {op['op'][-70:]}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(json.loads(argv[1]))
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    stages = parse_stages(args.stages, recipe.num_stages)
    if "torch" in args.frameworks:
        reason = benchmark_torch.missing()
        if reason:
            raise KgreedyError("--frameworks", reason, args.frameworks)
        benchmark_torch.check_recipe(recipe)
    shape, num_classes = benchmark_child.input_shape(recipe)[:2]
    base = {"recipe": recipe.to_dict(), "steps": args.steps, "image_shape": list(shape),
            "num_classes": num_classes}
    report = {"recipe": recipe.name, "batch_size": recipe.train.batch_size,
              "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "stages": []}
    for j in stages:
        figures = {}
        for framework in args.frameworks:
            print(f"profile: stage {j} {framework}", file=sys.stderr, flush=True)
            figures[framework] = summarise(framework, run_child(
                {**base, "stage": j, "framework": framework}))
        print_stage(j, figures)
        report["stages"].append({"stage": j, **figures})
    if args.json:
        write_json(args.json, report)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))

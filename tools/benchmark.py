"""Throughput, FLOP efficiency and memory of kgreedy's stage step (docs/DESIGN.md,
"Benchmark JSON").

    python tools/benchmark.py RECIPE [--stages 1,3] [--batch-size N] [--steps N] [--repeats N]
        [--warmup N] [--precisions LIST] [--torch]
        [--memory [--remat MODES] [--buffer-size N]] [--set KEY=VALUE ...] [--json OUT]

    python tools/benchmark.py recipes/cifar10_k2.json --set data.data_dir=../shared/tfds \
        --json out.json

For every stage j, side by side: `kgreedy` (StageLoop's traced step on one in-memory
synthetic batch), `minimal` (a hand-written tf.function + GradientTape loop doing the
same math: the overhead floor), `cached` (StageLoop fed the output of modules 1..j-1,
when StageLoop takes `cached_features`) and `pipeline` (StageLoop fed by the real tf.data
pipeline, when the data is there). Once per run: Keras `fit` of the deployed network end
to end, and a roofline probe (a large conv and a large matmul).

`--precisions none,auto` (two or more distinct `train.mixed_precision` values, `auto`
included) compares precisions in the same run: each selected stage's `kgreedy` step and
the end-to-end fit run once per value listed; everything else (minimal, cached,
pipeline, end_to_end_loop, decoupled, the probe) runs once, in the first value listed,
which is also what the per-stage table and the existing JSON keys then mean. Each child
resolves `auto` on its own machine, as a run would. The report gains a `precision`
table and a `precisions` JSON object (images/s and the ratio over the first value's).
Without the flag, everything runs in the recipe's own precision.

`--torch` adds the PyTorch reference of each selected stage (tools/benchmark_torch.py:
the same frozen prefix, block and head, SGD and L2, float32, in PyTorch's own layout),
timed the same way, and kgreedy's ratio over it (the `torch` JSON object and table
lines). Without PyTorch installed (`pip install -e ".[bench]"`) the lines say why and
the rest runs. Cap both frameworks' oneDNN the same way with the environment (e.g.
`ONEDNN_MAX_CPU_ISA=AVX2`, which the children inherit; the JSON records it).

`--memory` measures peak memory and images/s of end to end, plain and under
`keras.RematScope`, each stage and decoupled training instead (tools/benchmark_memory.py).

Everything runs on one device (the default strategy; `distribute.*` is ignored). Every
measurement runs in a fresh child process, so its peak RSS is its own. Children start
two at a time and prepare (import, build, trace, warm up) side by side, then are timed
one after the other while the rest wait idle. The figure is the median images/s over
`--repeats` repeats of `--steps` steps after `--warmup` untimed steps. The terminal gets
one table row per stage; `--json` writes docs/DESIGN.md's "Benchmark JSON" (plus ratios
and each child's raw figures). Progress goes to stderr. Exit status: 0 done; 1 a
measurement failed (its figures are null); 2 bad usage or recipe. This file is the
parent: the command line, the children's schedule and the report; a child, one
measurement, is tools/benchmark_child.py.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# No TensorFlow here: the parent stays small, because a child's ru_maxrss starts at
# its parent's RSS (Linux carries the high-water mark across fork and exec).
import benchmark_child
import benchmark_memory
import benchmark_torch
from benchmark_compare import (fmt, parse_precisions, precision_section, print_precisions,
                               print_torch, ratio, torch_section)
from benchmark_child import CONV_PROBE, MATMUL_PROBE, READY
from kgreedy import cli
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import write_json
from kgreedy.config.recipe import load_recipe

FLOPS_NOTE = ("needed work per image: forward of the frozen modules 1..j-1 + 3x the "
              "forward of module j and head j (forward+backward); end to end: 3x the "
              "forward of every module and the last head; Conv2D and Dense (MatMul) ops only "
              "(2*Hout*Wout*kh*kw*Cin*Cout, 2*in*out), psi, pooling, BN and ReLU ignored. "
              "An upper bound: "
              "nothing needs the gradient of module j's input, so its first conv costs 2x, "
              "not 3x")
PARALLEL = 2  # children preparing at once
KINDS = ("kgreedy", "minimal", "cached", "pipeline")
_DIGITS = re.compile(r"[0-9]+")


def log(message):
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------- command line ----

def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python tools/benchmark.py",
        description="Images/s, GFLOP/s and peak memory of kgreedy's stage step against a "
                    "minimal loop, the input pipeline and Keras fit end to end.")
    parser.add_argument("recipe", help="recipe JSON file")
    parser.add_argument("--stages", help="comma-separated stages to measure (default: all)")
    parser.add_argument("--batch-size", type=cli.positive_int,
                        help="default: train.batch_size")
    parser.add_argument("--steps", type=cli.positive_int, default=4, help="steps per repeat")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed repeats")
    parser.add_argument("--warmup", type=cli.positive_int, default=1,
                        help="untimed steps first: the call that traces runs them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key by dotted path (repeatable)")
    parser.add_argument("--precisions", metavar="LIST",
                        help="compare comma-separated train.mixed_precision values side by "
                             "side, e.g. none,auto (default: the recipe's own only)")
    parser.add_argument("--torch", action="store_true",
                        help="also time each stage's PyTorch reference (tools/"
                             "benchmark_torch.py; needs the [bench] extra)")
    benchmark_memory.add_arguments(parser)
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    benchmark_memory.check_arguments(args)
    if args.torch and args.memory:
        raise KgreedyError("--torch", "times the stage step; it does not go with --memory",
                           "--torch --memory")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise KgreedyError("--json", "its directory does not exist", args.json)
    return args


def parse_stages(text, num_stages):
    """`1,3` -> [1, 3]; every stage must exist in the recipe."""
    if text is None:
        return list(range(1, num_stages + 1))
    parts = [p.strip() for p in text.split(",")]
    # ASCII digits only: str.isdigit() also accepts '²', which int() then refuses.
    if not all(_DIGITS.fullmatch(p) and 1 <= int(p) <= num_stages for p in parts):
        raise KgreedyError("--stages", f"expected comma-separated stages in 1..{num_stages}",
                           text)
    return sorted({int(p) for p in parts})


# ------------------------------------------------------ parent: children ----

class Child:
    """One measurement in a fresh interpreter: prepares, says ready, waits for go.

    `job` is (kind, stage), or (kind, stage, precision) to run in another precision
    than `base`'s.
    """

    def __init__(self, job, base, label):
        self.job, self.label, self.start = job, label, time.perf_counter()
        self.tmp = tempfile.TemporaryDirectory(prefix="kgreedy-bench-")
        self.result_path = os.path.join(self.tmp.name, "result.json")
        spec = {**base, "kind": job[0], "stage": job[1], "result": self.result_path,
                **({"precision": job[2]} if len(job) > 2 else {})}
        self.stderr = open(os.path.join(self.tmp.name, "stderr"), "w+", encoding="utf-8")
        log(f"{label}: preparing")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath((benchmark_torch if job[0] == "torch"
                                              else benchmark_child).__file__),
             json.dumps(spec)],
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


def run_jobs(jobs, base, errors=None):
    """Runs each job in its own child, PARALLEL preparing at once, timed one by one
    (a failed job's last line into `errors`, a dict, when given).

    Returns:
        {(kind, stage): result or None}; stops after the probe if the probe failed.
    """
    results, queue, done = {}, list(jobs), 0
    while queue:
        batch, queue = queue[:PARALLEL], queue[PARALLEL:]
        total = done + len(batch) + len(queue)
        children = [Child(job, base, f"[{done + i}/{total}] " + " ".join(
            [job[0].replace("_", "-") if job[1] is None else f"stage {job[1]} {job[0]}",
             *job[2:]])) for i, job in enumerate(batch, start=1)]
        for child in children:
            child.wait_ready()
        # A warmed-up pipeline child keeps filling its prefetch buffers: time it first,
        # so it never runs beside another child's timed steps.
        for child in sorted(children, key=lambda c: c.job[0] != "pipeline"):
            results[child.job] = child.finish()
            if child.error and errors is not None:
                errors[child.job] = child.error
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
                    "num_classes": probe["num_classes"],
                    "remat_layer_names": probe["remat_layer_names"]}
    return results


def plan(stages, precisions=None, remat=None, torch=False):
    """The jobs in run order: the probe, each stage's measurements, then the whole net:
    end to end (Keras fit, and kgreedy's loop) and decoupled; with `precisions`, each
    stage's kgreedy step and the fit again per precision after the first; with `torch`,
    each stage's PyTorch reference; with `remat` (`--memory`'s modes), the memory rows
    instead."""
    if remat is not None:
        return [("probe", None), *benchmark_memory.jobs(stages, remat)]
    others = (precisions or [])[1:]
    jobs = [("probe", None)]
    for j in stages:
        jobs += [(k, j) for k in KINDS if k != "cached" or j >= 2]
        jobs += [("kgreedy", j, p) for p in others] + ([("torch", j)] if torch else [])
    return jobs + [("end_to_end", None), *[("end_to_end", None, p) for p in others],
                   ("end_to_end_loop", None), ("decoupled", None)]


# -------------------------------------------------------- parent: report ----

def stage_row(j, probe, runs, e2e_peak):
    """One stage's figures: docs/DESIGN.md's "Benchmark JSON" keys first, then extras."""
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


def whole_net_row(runs, kind, gflop, e2e, last):
    """A whole-net measurement (`end_to_end_loop`, `decoupled`) against Keras' end-to-end
    fit and the last greedy stage."""
    run = runs.get((kind, None)) or {}
    ips, above = run.get("images_per_second"), run.get("peak_above_baseline_mb")
    return {"images_per_second": ips, "peak_rss_mb": run.get("peak_rss_mb"),
            "peak_above_baseline_mb": above, "gpu_peak_mb": run.get("gpu_peak_mb"),
            "gflop_per_image": gflop, "achieved_gflops": ips and gflop * ips,
            "over_end_to_end": ratio(ips, e2e.get("images_per_second")),
            "peak_over_end_to_end": ratio(above, e2e.get("peak_above_baseline_mb")),
            "over_last_stage": ratio(ips, last.get("kgreedy_images_per_second")),
            "run": run or None}


def assemble(recipe, args, stages, runs):
    """The JSON report (docs/DESIGN.md, "Benchmark JSON", plus ratios and each child's
    raw figures)."""
    probe = runs[("probe", None)]
    e2e = runs.get(("end_to_end", None)) or {}
    rows = [stage_row(j, probe, runs, e2e.get("peak_above_baseline_mb")) for j in stages]
    e2e_ips, e2e_gflop = e2e.get("images_per_second"), probe["end_to_end_flops"] / 1e9
    last = rows[-1] if stages[-1] == recipe.num_stages else {}
    # Each module and its head forward and backward: the same upper bound as a stage's.
    decoupled_gflop = 3 * sum(own for _, own in probe["flops"]) / 1e9
    loop, decoupled = (runs.get((k, None)) or {} for k in ("end_to_end_loop", "decoupled"))
    loop_ips, decoupled_ips = (r.get("images_per_second") for r in (loop, decoupled))
    loop_peak, decoupled_peak = (r.get("peak_above_baseline_mb") for r in (loop, decoupled))
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
        "end_to_end_loop": whole_net_row(runs, "end_to_end_loop", e2e_gflop, e2e, last),
        "decoupled": {**whole_net_row(runs, "decoupled", decoupled_gflop, e2e, last),
                      "over_end_to_end_loop": ratio(decoupled_ips, loop_ips),
                      "peak_over_end_to_end_loop": ratio(decoupled_peak, loop_peak),
                      "modules": recipe.num_stages,
                      "buffer_size": recipe.train.decoupled.buffer_size},
        "import_baseline_rss_mb": statistics.median(baselines) if baselines else None,
        "stages": rows,
        "steps": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup,
        "image_shape": probe["image_shape"], "num_classes": probe["num_classes"],
        "flops_note": FLOPS_NOTE, "warnings": probe["warnings"],
    }


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
    for key, name in (("end_to_end_loop", "end to end, kgreedy's loop"),
                      ("decoupled", f"decoupled, {report['decoupled']['modules']} modules")):
        row = report[key]
        print(f"{name}: {fmt(row['images_per_second'])} images/s "
              f"({fmt(row['over_end_to_end'], '.2f')}x end-to-end fit), "
              f"{row['gflop_per_image']:.3f} GFLOP/img, peak "
              f"{fmt(row['peak_above_baseline_mb'], ',.0f')} MB above baseline "
              f"({fmt(row['peak_over_end_to_end'], '.2f')}x end-to-end fit's)")
    if "precisions" in report:
        print_precisions(report["precisions"])
    if "torch" in report:
        print_torch(report["torch"])
    if "memory" in report:
        benchmark_memory.print_section(report["memory"])
    n, h, w, cin, cout = CONV_PROBE
    print(f"roofline: conv3x3 {n}x{h}x{w}x{cin}->{cout} forward {m['conv_gflops']:,.1f} "
          f"GFLOP/s; matmul {MATMUL_PROBE}x{MATMUL_PROBE} {m['matmul_gflops']:,.1f} GFLOP/s")
    print(f"machine: {m['cpu']}, {m['cores']} logical cores, GPU {m['gpu'] or 'none'}, "
          f"TensorFlow {m['tensorflow']}, Keras {m['keras']}")
    print(f"FLOPs: {report['flops_note']}")


def main(argv=None):
    args = parse_args(argv)
    precisions = parse_precisions(args.precisions)
    overrides = args.set + ([f"train.batch_size={args.batch_size}"] if args.batch_size else [])
    recipe = load_recipe(args.recipe, overrides)
    stages = parse_stages(args.stages, recipe.num_stages)
    if args.torch:
        benchmark_torch.check_recipe(recipe)  # before any child starts
    no_torch = args.torch and benchmark_torch.missing()
    if no_torch:
        log(f"torch: not measured: {no_torch}")
    buffer_size = benchmark_memory.buffer_size(args, recipe.train.batch_size)
    base = {"recipe": recipe.to_dict(), "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup, "buffer_size": buffer_size,
            **({"precision": precisions[0]} if precisions else {})}
    errors = {}  # a failed child's last line, by job
    runs = run_jobs(plan(stages, precisions, args.remat if args.memory else None,
                         args.torch and not no_torch), base, errors)
    if runs[("probe", None)] is None:
        return cli.EXIT_FAILURE
    report = assemble(recipe, args, stages, runs)
    if precisions:
        report["precisions"] = precision_section(stages, precisions, runs)
    if args.torch:
        report["torch"] = torch_section(stages, runs, no_torch or None)
    if args.memory:
        report["memory"] = benchmark_memory.section(runs, stages, args.remat, buffer_size, errors)
    print_report(report)
    if args.json:
        write_json(args.json, report)
    return cli.EXIT_OK if all(runs.values()) else cli.EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""`tools/benchmark.py --memory`: peak memory and images/s of every way to train a
network, side by side in one run (docs/BENCHMARKS.md, "Memory").

The rows, each a fresh child of tools/benchmark_child.py on one in-memory synthetic
batch:

- `end_to_end`: Keras `fit` of the deployed network (the reference of every ratio);
- `end_to_end_loop`: kgreedy's own `StageLoop` end to end, the loop the greedy and
  decoupled rows run (`*_over_end_to_end_loop`: the ratios over it);
- `remat_MODE`: the same `fit` of the network built under `keras.RematScope(MODE)`,
  one row per `--remat` mode. Keras captures the scope when a layer is made and
  applies it when the layer is called, so the child makes the net inside the scope.
  `full` and `larger_than` wrap every layer's `call` in `tf.recompute_grad`, which
  refuses keyword arguments in a traced graph (keras-team/keras#21207): every
  BatchNormalization and every Keras model is called with `training=`, so these
  modes run with `run_eagerly=True`, beside an `end_to_end_eager` row (the same fit,
  eager, no scope) to tell what the scope does from what eager execution does.
  `list_of_layers` names every leaf layer whose `call` takes its inputs only (conv,
  ReLU, Add, pooling: the layers a traced graph can recompute);
- `greedy_largest_stage`: the greedy stage whose kgreedy step peaks highest (every
  selected stage is measured; `stages` of the report has them all);
- `decoupled` and `decoupled_buffer` (`train.decoupled.buffer_size` = `--buffer-size`).

Each row has `images_per_second`, `peak_above_baseline_mb` (and
`warmup_peak_above_baseline_mb`, the peak when the warm-up ended: what grows after it,
the timed steps kept) and both over `end_to_end`'s (`over_end_to_end`,
`peak_over_end_to_end`). A remat row also says whether the scope really applied
(`remat`): how many layers it wraps, and the forward Conv2D ops in the traced
gradient of the net (a recomputed conv appears twice) or why no graph could be
traced. Keras 3.15 recomputes outside its mixed-precision autocast scope, so the remat
rows fail (their `error`) unless the recipe runs in float32.

This module imports no TensorFlow at module level: the parent imports it, and a
child's peak RSS starts at its parent's (see tools/benchmark.py).
"""

import inspect
import re

from kgreedy import cli
from kgreedy.base.errors import KgreedyError

REMAT_MODES = ("activations", "list_of_layers", "full", "larger_than")
DEFAULT_REMAT = "activations,list_of_layers,full"
EAGER_MODES = ("full", "larger_than")  # keras-team/keras#21207: no graph with BN
# The targets (issue 28): peak above baseline over end to end's, at most.
TARGETS = {"decoupled": 0.6, "greedy_largest_stage": 0.5}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ------------------------------------------------------------------ parent ----

def add_arguments(parser):
    """`--memory`, `--remat` and `--buffer-size` of tools/benchmark.py."""
    parser.add_argument("--memory", action="store_true",
                        help="peak memory and images/s of end to end, RematScope, greedy, "
                             "decoupled and decoupled with a replay buffer, side by side")
    parser.add_argument("--remat", metavar="MODES",
                        help=f"with --memory: keras.RematScope modes, one row each "
                             f"(default {DEFAULT_REMAT})")
    parser.add_argument("--buffer-size", type=cli.positive_int, metavar="N",
                        help="with --memory: the replay buffer's entries (default: 10 "
                             "batches)")


def check_arguments(args):
    """Refuses the memory flags without `--memory` and `--precisions` with it; turns
    `args.remat` into its list of modes, in the order given.

    Raises:
        KgreedyError: bad usage (one line, exit status 2).
    """
    for flag, value in (("--remat", args.remat), ("--buffer-size", args.buffer_size)):
        if value is not None and not args.memory:
            raise KgreedyError(flag, "only applies with --memory", value)
    if args.memory and args.precisions:
        raise KgreedyError("--precisions", "does not combine with --memory", args.precisions)
    parts = [p.strip() for p in (args.remat or DEFAULT_REMAT).split(",")]
    if len(set(parts)) < len(parts) or not set(parts) <= set(REMAT_MODES):
        raise KgreedyError("--remat", "expected distinct, comma-separated values of "
                           + ", ".join(REMAT_MODES), args.remat)
    args.remat = parts


def buffer_size(args, batch_size):
    """The replay buffer's entries: `--buffer-size`, else 10 batches.

    Raises:
        KgreedyError: less than a batch, which the recipe would refuse in a child.
    """
    size = args.buffer_size or 10 * batch_size
    if size < batch_size:
        raise KgreedyError("--buffer-size", f"must hold at least one batch ({batch_size})",
                           args.buffer_size)
    return size


def jobs(stages, modes):
    """The memory run's jobs after the probe, in run order: (kind, stage)."""
    eager = [("end_to_end_eager", None)] if set(modes) & set(EAGER_MODES) else []
    return [("end_to_end", None), ("end_to_end_loop", None), *eager,
            *[(f"remat_{m}", None) for m in modes],
            *[("kgreedy", j) for j in stages], ("decoupled", None),
            ("decoupled_buffer", None)]


def _ratio(a, b):
    return a / b if a is not None and b else None


def section(runs, stages, modes, buffer_size, errors=None):
    """The `memory` object of the report: one row per way of training, each against
    end to end (a failed one with its `error`, the child's last line); the targets of
    issue 28 against the figures."""
    errors = errors or {}
    e2e = runs.get(("end_to_end", None)) or {}
    eager_run = runs.get(("end_to_end_eager", None)) or {}
    loop = runs.get(("end_to_end_loop", None)) or {}
    peaks = {j: (runs.get(("kgreedy", j)) or {}).get("peak_above_baseline_mb")
             for j in stages}
    measured = [j for j in stages if peaks[j] is not None]
    largest = max(measured, key=peaks.get) if measured else None

    def row(what, key, stage=None, eager=False, remat=False):
        run = runs.get(key) or {}
        ips, peak = run.get("images_per_second"), run.get("peak_above_baseline_mb")
        return {"what": what, "stage": stage, "run_eagerly": eager,
                "images_per_second": ips, "peak_above_baseline_mb": peak,
                "warmup_peak_above_baseline_mb": run.get("warmup_peak_above_baseline_mb"),
                "over_end_to_end": _ratio(ips, e2e.get("images_per_second")),
                "peak_over_end_to_end": _ratio(peak, e2e.get("peak_above_baseline_mb")),
                "over_end_to_end_loop": _ratio(ips, loop.get("images_per_second")),
                "peak_over_end_to_end_loop": _ratio(peak, loop.get("peak_above_baseline_mb")),
                "over_end_to_end_eager":
                    _ratio(ips, eager_run.get("images_per_second")) if eager else None,
                "peak_over_end_to_end_eager":
                    _ratio(peak, eager_run.get("peak_above_baseline_mb")) if eager else None,
                "remat": run.get("remat") if remat else None, "error": errors.get(key),
                "run": run or None}

    rows = [row("end_to_end", ("end_to_end", None)),
            row("end_to_end_loop", ("end_to_end_loop", None))]
    if ("end_to_end_eager", None) in runs:
        rows.append(row("end_to_end_eager", ("end_to_end_eager", None), eager=True))
    rows += [row(f"remat_{m}", (f"remat_{m}", None), eager=m in EAGER_MODES, remat=True)
             for m in modes]
    rows += [row("greedy_largest_stage", ("kgreedy", largest), stage=largest),
             row("decoupled", ("decoupled", None)),
             row("decoupled_buffer", ("decoupled_buffer", None))]
    by_what = {r["what"]: r for r in rows}
    targets = {what: {"peak_over_end_to_end_at_most": limit,
                      "peak_over_end_to_end": by_what[what]["peak_over_end_to_end"],
                      "peak_over_end_to_end_loop": by_what[what]["peak_over_end_to_end_loop"],
                      "met": None if by_what[what]["peak_over_end_to_end"] is None
                      else by_what[what]["peak_over_end_to_end"] <= limit}
               for what, limit in TARGETS.items()}
    return {"remat_modes": modes, "buffer_size": buffer_size, "largest_stage": largest,
            "stage_peaks_above_baseline_mb": {str(j): peaks[j] for j in stages},
            "rows": rows, "targets": targets}


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_section(memory):
    """The `memory` table: one row per way of training, ratios over end to end's."""
    print("memory: peak RSS above the import baseline (at the end; warm-up: when the "
          "warm-up ended, so growth after it is memory the timed steps kept) and images/s; "
          "ratios over end to end's (Keras fit, compiled) and, /loop, over kgreedy's "
          "end-to-end loop's")
    print(f"{'what':<22} {'eager':>5} {'peak MB':>8} {'/e2e':>5} {'/loop':>5} {'warm-up':>8} "
          f"{'images/s':>9} {'/e2e':>5}  remat check")
    for r in memory["rows"]:
        what = r["what"] + (f" ({r['stage']})" if r.get("stage") else "")
        remat = r.get("remat") or {}
        check = ""
        if remat:
            check = (f"{remat['wrapped_layers']} of {remat['leaf_layers']} layers wrapped; "
                     + (f"{remat['graph_conv_ops']} forward convs in the traced gradient "
                        f"for {remat['conv_layers']} conv layers"
                        if remat["graph_error"] is None else
                        f"no traced graph: {remat['graph_error']}"))
        print(f"{what:<22} {'yes' if r.get('run_eagerly') else '':>5} "
              f"{_fmt(r['peak_above_baseline_mb'], ',.0f'):>8} "
              f"{_fmt(r['peak_over_end_to_end'], '.2f'):>5} "
              f"{_fmt(r['peak_over_end_to_end_loop'], '.2f'):>5} "
              f"{_fmt(r['warmup_peak_above_baseline_mb'], ',.0f'):>8} "
              f"{_fmt(r['images_per_second'], ',.1f'):>9} "
              f"{_fmt(r['over_end_to_end'], '.2f'):>5}  {check}")
    for what, t in memory["targets"].items():
        verdict = {None: "not measured", True: "met", False: "missed"}[t["met"]]
        print(f"memory target: {what} peak <= {t['peak_over_end_to_end_at_most']}x end to "
              f"end's: {_fmt(t['peak_over_end_to_end'], '.2f')}x, {verdict} "
              f"({_fmt(t['peak_over_end_to_end_loop'], '.2f')}x kgreedy's end-to-end loop's)")


# ------------------------------------------------------------------- child ----

def _leaves(layer):
    return [leaf for leaf in layer._flatten_layers(include_self=True, recursive=True)
            if not list(leaf._flatten_layers(include_self=False))]


def inputs_only_layers(layers):
    """Names of the leaf layers of `layers` whose `call` takes nothing but its inputs:
    those `tf.recompute_grad` can wrap in a traced graph (a layer called with
    `training=` or `mask=` cannot, keras-team/keras#21207)."""
    return sorted({leaf.name for layer in layers for leaf in _leaves(layer)
                   if len(inspect.signature(leaf.call).parameters) == 1})


def remat_scope(keras, mode, layer_names):
    """The `keras.RematScope` of a `remat_MODE` row."""
    if mode == "list_of_layers":
        return keras.RematScope(mode=mode, layer_names=list(layer_names))
    return keras.RematScope(mode=mode)


def remat_check(tf, model, mode, layer_names, image_shape):
    """Whether the scope applied to `model`: the leaf layers it wraps, and the forward
    Conv2D ops in one traced gradient step (each recomputed conv adds one), or the
    first line of why the gradient cannot be traced. Run after the peak is read: the
    trace takes memory of its own."""
    leaves = _leaves(model)
    # `_remat_mode` is what Keras captured from the scope when the layer was made, and
    # what its `__call__` reads: no public API tells it.
    wrapped = [leaf for leaf in leaves if leaf._remat_mode is not None and (
        mode in ("full", "larger_than")
        or (mode == "activations" and getattr(leaf, "activation", None) is not None)
        or (mode == "list_of_layers" and leaf.name in layer_names))]
    activations = sorted({getattr(leaf.activation, "__name__", str(leaf.activation))
                          for leaf in wrapped if mode == "activations"})

    @tf.function
    def gradients(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(x, training=True), tf.float32))
        return tape.gradient(loss, model.trainable_variables)

    convs, error = None, None
    try:
        graph = gradients.get_concrete_function(
            tf.TensorSpec([1, *image_shape], tf.float32)).graph
        convs = sum(op.type == "Conv2D" for op in graph.get_operations())
    except (ValueError, AttributeError, TypeError) as e:  # the mode cannot be traced
        lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
        error = next((line for line in lines if "custom_gradient" in line),
                     lines[-1] if lines else type(e).__name__)
    return {"mode": mode, "leaf_layers": len(leaves), "wrapped_layers": len(wrapped),
            "wrapped_activations": activations,
            "conv_layers": sum(type(leaf).__name__ == "Conv2D" for leaf in leaves),
            "graph_conv_ops": convs, "graph_error": error}

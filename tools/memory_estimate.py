"""Holds kgreedy's memory estimate against what a run's tensors really took, stage by
stage (docs/performance.md, "How close the estimate is").

    python tools/memory_estimate.py RECIPE [--set KEY=VALUE ...] [--images N]
        [--eval-images N] [--json OUT]

    python tools/memory_estimate.py recipes/resnet32_cifar10_k4.json \
        --set data.data_dir=../shared/tfds

The recipe trains one epoch per stage, one pass over its first `--images` training
images (a TFDS set: `data.train_split=train[:N]`, `data.eval_split=test[:M]`), without
export, in a fresh `python -m kgreedy.train` whose TensorFlow CPU allocator keeps
statistics (TF_CPU_ALLOCATOR_USE_BFC=true): each stage's `cpu_tensor_peak_memory_mb`
in summary.json is the peak of every tensor alive during the stage (weights, optimizer
slots, activations, the data's in-memory cache, tf.data's buffers), without the
Python and TensorFlow runtime around them, which the estimate leaves out too. The
estimate is `kgreedy.training.memory.estimate` on the same recipe, its precision
resolved as the run resolves it. The run's stdout goes to stderr; the table to stdout.
Exit status: 0 done (whatever the ratios); 1 the run failed; 2 bad usage or recipe.
"""

import json
import os
import subprocess
import sys
import tempfile

from kgreedy import cli
from kgreedy.base.files import read_json, write_json
from kgreedy.base.machine import machine

TOLERANCE = 0.15  # the estimate's target: within 15 % of the measured peak


def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python tools/memory_estimate.py",
        description="Each stage's memory estimate against the peak of the tensors of a "
                    "short real run of the recipe.")
    parser.add_argument("recipe", help="recipe JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--images", type=cli.positive_int, default=2560,
                        help="training images (a TFDS set's first N; default 2560)")
    parser.add_argument("--eval-images", type=cli.positive_int, default=1000,
                        help="evaluation images (a TFDS set's first N; default 1000)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def overrides(args, recipe):
    """The --set values of the measured run: the user's, then one epoch per stage,
    one pass, no export; a TFDS set's splits cut to --images and --eval-images."""
    short = ["train.epochs_per_stage=1", "train.steps_per_epoch=null",
             "export.enabled=false"]
    if recipe.data.source == "tfds":
        train = (recipe.data.train_split or "train").split("[")[0]
        evals = (recipe.data.eval_split or "test").split("[")[0]
        short += [f"data.train_split={train}[:{args.images}]",
                  f"data.eval_split={evals}[:{args.eval_images}]"]
    return [*args.set, *short]


def estimated(recipe):
    """{stage: bytes} of `kgreedy.training.memory.estimate`, as `kgreedy.train` sizes
    the recipe (its precision resolved on this machine)."""
    from kgreedy.data import describe
    from kgreedy.training import distribute, memory, precision, session

    spec, strategy = session.start(recipe)
    recipe, _ = precision.resolve(recipe)
    workers = distribute.WorkerInfo(strategy).num_workers
    _, stages, note = memory.estimate(recipe, describe(recipe.data), workers,
                                      replicas=strategy.num_replicas_in_sync)
    if stages is None:
        raise SystemExit(f"memory_estimate: {note}")
    return recipe, {s.stage: s for s in stages}


def measured(args, sets):
    """{stage: MB} of the run's `cpu_tensor_peak_memory_mb`, and its summary."""
    with tempfile.TemporaryDirectory(prefix="kgreedy-memory-") as scratch:
        output = os.path.join(scratch, "run")
        argv = [sys.executable, "-m", "kgreedy.train", args.recipe, "--output", output]
        for value in sets:
            argv += ["--set", value]
        env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run(argv, env=env, stdout=sys.stderr, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.returncode if proc.returncode == 2 else 1)
        summary = read_json(os.path.join(output, "summary.json"))
    return {e["stage"]: e.get("cpu_tensor_peak_memory_mb") for e in summary["stages"]}


def rows(estimates, measures):
    table = []
    for stage, estimate in sorted(estimates.items()):
        mb = estimate.total / 2 ** 20
        peak = measures.get(stage)
        ratio = None if not peak else mb / peak
        table.append({"stage": stage, "estimate_mb": round(mb, 1), "measured_mb": peak,
                      "ratio": None if ratio is None else round(ratio, 3),
                      "within_tolerance": None if ratio is None
                      else abs(ratio - 1) <= TOLERANCE,
                      "parts_mb": {key: round(getattr(estimate, key) / 2 ** 20, 1) for key in (
                          "weights", "optimizer", "gradients", "activations", "evaluation",
                          "feature_cache", "replay_buffers", "data")}})
    return table


def main(argv=None):
    """Measures, compares and prints; returns the exit status."""
    args = parse_args(argv)
    from kgreedy.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    sets = overrides(args, recipe)
    recipe, estimates = estimated(load_recipe(args.recipe, sets))
    table = rows(estimates, measured(args, sets))
    print(f"{recipe.name} ({recipe.train.mode}, batch {recipe.train.batch_size}, "
          f"{recipe.train.mixed_precision}): estimate against the peak of the run's tensors")
    print(f"{'stage':>5} {'estimate MB':>12} {'measured MB':>12} {'ratio':>6}  within "
          f"{TOLERANCE:.0%}")
    for row in table:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['stage']:>5} {row['estimate_mb']:>12,.1f} "
              f"{row['measured_mb'] or 0:>12,.1f} {ratio:>6}  "
              f"{'-' if row['within_tolerance'] is None else 'yes' if row['within_tolerance'] else 'NO'}")
    if args.json:
        import tensorflow as tf
        write_json(args.json, {"recipe": args.recipe, "set": sets, "name": recipe.name,
                               "mode": recipe.train.mode,
                               "precision": recipe.train.mixed_precision,
                               "machine": machine(tensorflow=tf.__version__),
                               "tolerance": TOLERANCE, "stages": table})
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

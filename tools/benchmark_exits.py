"""Latency and throughput of an early-exit export against the plain export of the
same run, side by side in one process (docs/serving.md, "Early exits").

    python tools/benchmark_exits.py RUN_DIR --plain V --exits V [--images N]
        [--latency-images N] [--repeats N] [--json OUT]

    python tools/benchmark_exits.py runs/local/dgl_k4 --plain 1 --exits 3 \
        --json docs/benchmark_exits.json

Both versions are below RUN_DIR/export/MODEL_NAME (the recipe's). The images are the
first `--images` of the run's evaluation split, as `kgreedy.train` reads it, sent to
each export's `serving_default` as raw pixels:

- batch 1: `--latency-images` requests of one image each, the median and mean
  milliseconds per request;
- batch 64: the images in batches of 64, images per second (median of `--repeats`).

Each repeat times the plain export, then the early-exit one, so that a change of the
machine's speed falls on both. The report also gives each export's accuracy on these
images and, for the early-exit export, the share answered at each head. Exit status:
0 done; 2 bad usage, run or version.
"""

import os
import statistics
import sys
import time

from kgreedy import cli
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import read_json, write_json
from kgreedy.base.machine import machine
from kgreedy.serving.signatures import EXIT_PLAN_FILE

BATCH = 64


def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python tools/benchmark_exits.py",
        description="Batch-1 latency and batch-64 throughput of an early-exit export "
                    "against the plain export of the same run.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a kgreedy.train run directory")
    parser.add_argument("--plain", type=cli.positive_int, required=True,
                        help="version of the plain export (heads last)")
    parser.add_argument("--exits", type=cli.positive_int, required=True,
                        help="version of the early-exit export")
    parser.add_argument("--images", type=cli.positive_int, default=2048,
                        help="evaluation images for the throughput (default 2048)")
    parser.add_argument("--latency-images", type=cli.positive_int, default=300,
                        help="one-image requests for the latency (default 300)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="timed repeats (default 3)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def eval_images(run_dir, count):
    """(images, labels) NumPy arrays: up to `count` of the run's evaluation split."""
    import numpy as np

    from kgreedy import data
    from kgreedy.training import rundir

    run = rundir.RunDir(run_dir)
    if not os.path.isfile(run.recipe):
        raise KgreedyError("run_dir", f"not a kgreedy.train run directory: {run.recipe} "
                           "is missing", run_dir)
    from kgreedy.config.recipe import recipe_from_dict

    recipe = recipe_from_dict(run.read_json(run.recipe))
    spec = data.load_spec(run.dataset)
    datasets = data.load(recipe.data, spec, batch_size=recipe.train.batch_size,
                         eval_batch_size=BATCH, seed=recipe.seed)
    images, labels = [], []
    try:
        for x, y in datasets.eval:
            images.append(x.numpy())
            labels.append(y.numpy())
            if sum(len(b) for b in images) >= count:
                break
    finally:
        datasets.close()
    return recipe, np.concatenate(images)[:count], np.concatenate(labels)[:count]


def load_export(run_dir, model_name, version):
    import tensorflow as tf

    path = os.path.join(run_dir, "export", model_name, str(version))
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise KgreedyError("--plain/--exits", "no SavedModel at this version", path)
    return path, tf.saved_model.load(path).signatures["serving_default"]


def timings(signature, images, latency_images):
    """(ms per one-image request, images/s at batch 64, outputs of every image)."""
    import numpy as np
    import tensorflow as tf

    latencies = []
    for image in images[:latency_images]:
        start = time.perf_counter()
        signature(images=tf.constant(image[None]))
        latencies.append(1e3 * (time.perf_counter() - start))
    start, outputs = time.perf_counter(), []
    for i in range(0, len(images), BATCH):
        outputs.append(signature(images=tf.constant(images[i:i + BATCH])))
    seconds = time.perf_counter() - start
    merged = {k: np.concatenate([o[k].numpy() for o in outputs])
              for k in outputs[0] if k != "class_names"}
    return latencies, len(images) / seconds, merged


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    recipe, images, labels = eval_images(args.run_dir, args.images)
    exports = {kind: load_export(args.run_dir, recipe.model_name, version)
               for kind, version in (("plain", args.plain), ("early_exit", args.exits))}
    if "exit_stage" not in exports["early_exit"][1].structured_outputs:
        raise KgreedyError("--exits", "this version is not an early-exit export (no "
                           "exit_stage output)", args.exits)
    for _, signature in exports.values():  # warm-up: trace and set up the kernels
        signature(images=tf.constant(images[:1]))
        signature(images=tf.constant(images[:BATCH]))
    runs = {kind: [] for kind in exports}
    for repeat in range(args.repeats):
        for kind, (_, signature) in exports.items():
            runs[kind].append(timings(signature, images, args.latency_images))
            print(f"benchmark_exits: repeat {repeat + 1}/{args.repeats} {kind}: "
                  f"{statistics.median(runs[kind][-1][0]):.2f} ms at batch 1, "
                  f"{runs[kind][-1][1]:,.0f} images/s at batch {BATCH}", file=sys.stderr)
    rows = {}
    for kind, results in runs.items():
        latencies = [ms for r in results for ms in r[0]]
        outputs = results[-1][2]
        rows[kind] = {"path": exports[kind][0],
                      "batch1_median_ms": statistics.median(latencies),
                      "batch1_mean_ms": statistics.fmean(latencies),
                      f"batch{BATCH}_images_per_second": statistics.median(
                          r[1] for r in results),
                      "accuracy": float((outputs["class_ids"] == labels).mean())}
        if "exit_stage" in outputs:
            heads = len(read_json(os.path.join(exports[kind][0],
                                               EXIT_PLAN_FILE))["thresholds"])
            rows[kind]["exits"] = (np.bincount(outputs["exit_stage"], minlength=heads + 1)[1:]
                                   / len(labels)).tolist()
    plain, exits = rows["plain"], rows["early_exit"]
    report = {"run_dir": args.run_dir, "images": len(images),
              "latency_images": min(args.latency_images, len(images)),
              "repeats": args.repeats, "machine": machine(tensorflow=tf.__version__),
              "plain": plain, "early_exit": exits,
              "batch1_latency_ratio": exits["batch1_median_ms"] / plain["batch1_median_ms"],
              f"batch{BATCH}_throughput_ratio": (exits[f"batch{BATCH}_images_per_second"]
                                                 / plain[f"batch{BATCH}_images_per_second"])}
    print(f"{'export':<11} {'batch 1 ms':>10} {f'batch {BATCH} img/s':>15} {'accuracy':>9}")
    for kind, row in rows.items():
        print(f"{kind:<11} {row['batch1_median_ms']:>10.2f} "
              f"{row[f'batch{BATCH}_images_per_second']:>15,.0f} {row['accuracy']:>9.4f}")
    print(f"early exit / plain: batch 1 latency {report['batch1_latency_ratio']:.2f}x, "
          f"batch {BATCH} throughput {report[f'batch{BATCH}_throughput_ratio']:.2f}x; "
          f"answered at heads 1..K: {', '.join(f'{s:.1%}' for s in exits['exits'])}")
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"TensorFlow {tf.__version__}")
    if args.json:
        write_json(args.json, report)
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

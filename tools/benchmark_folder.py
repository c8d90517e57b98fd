"""Epoch time of an image-folder source with and without the decoded-image cache.

    python tools/benchmark_folder.py [FOLDER] [--make N] [--image-size S]
        [--augment imagenet] [--epochs E] [--train-epochs E] [--json OUT]

FOLDER is an image folder kgreedy reads (`train/` and `val/`, ...). Without it,
`--make N` writes N photo-sized JPEGs (320-640 x 240-480 pixels, 10 classes, 10 %
for `val/`) into a temporary folder first. Side by side, for `data.cache` none and
memory:

- the input pipeline alone: the first pass (decode, and with the cache, keep) and
  each of `--epochs` epochs of `Datasets.train_for` (augmentation included) run to
  the end with nothing else running;
- a training epoch: `python -m kgreedy.train recipes/quickstart.json` with its first
  block only, on the folder, for `--train-epochs` epochs; per-epoch seconds from
  metrics.jsonl (evaluation excluded).

It prints a table and, with `--json`, writes the figures and the machine.
Exit status: 0 done; 2 bad usage or an unusable folder.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from kgreedy import cli
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import write_json
from kgreedy.base.machine import machine
from kgreedy.training.rundir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "memory")


def parse_args(argv):
    parser = cli.ArgumentParser(
        prog="python tools/benchmark_folder.py",
        description="Epoch time of an image folder with and without data.cache.")
    parser.add_argument("folder", nargs="?", help="an image folder (default: --make)")
    parser.add_argument("--make", type=cli.positive_int, default=2000,
                        help="JPEGs to write when no folder is given (default 2000)")
    parser.add_argument("--image-size", type=cli.positive_int, default=64)
    parser.add_argument("--augment", default="imagenet", choices=("none", "cifar", "imagenet"))
    parser.add_argument("--batch-size", type=cli.positive_int, default=64)
    parser.add_argument("--epochs", type=cli.positive_int, default=3,
                        help="input-pipeline epochs timed per mode")
    parser.add_argument("--train-epochs", type=int, default=2,
                        help="training epochs of stage 1 per mode (0: none)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser.parse_args(argv)


def make_photos(root, count, seed=0):
    """Writes `count` photo-like JPEGs (smooth colour fields plus grain)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        label = i % 10
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(x / (20 + 7 * label) + c) * np.cos(y / (30 + 5 * c))
                         for c in range(3)], -1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 12, (h, w, 3)), 0, 255)
        split = "val" if (i // 10) % 10 == 0 else "train"  # the first 10 of every 100
        path = os.path.join(root, split, f"class{label}", f"{i:05d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=90)


def pipeline_figures(folder, args, mode):
    """Seconds of the first pass and of each input-pipeline epoch in `mode`."""
    from kgreedy import data
    from kgreedy.config.recipe import DataConfig

    config = DataConfig(source="image_folder", data_dir=folder, image_size=args.image_size,
                        channels=3, augment=args.augment, cache=mode, mean=(0.0,),
                        std=(1.0,))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        datasets = data.load(config, data.describe(config), batch_size=args.batch_size,
                             cache_dir=cache_dir)
        first = time.perf_counter() - start
        epochs, images = [], 0
        for epoch in range(args.epochs):
            start = time.perf_counter()
            images = sum(int(x.shape[0]) for x, _ in datasets.train_for(epoch))
            epochs.append(time.perf_counter() - start)
        datasets.close()
    return {"first_pass_seconds": first, "epoch_seconds": epochs, "images": images,
            "images_per_second": [images / s for s in epochs]}


def training_figures(folder, args, mode):
    """Per-epoch seconds of stage 1 of the quickstart model trained on the folder."""
    with tempfile.TemporaryDirectory() as run:
        command = [sys.executable, "-m", "kgreedy.train",
                   os.path.join(ROOT, "recipes", "quickstart.json"), "--output", run,
                   "--set", "data.source=image_folder", "--set", f"data.data_dir={folder}",
                   "--set", f"data.image_size={args.image_size}", "--set", "data.channels=3",
                   "--set", f"data.augment={args.augment}", "--set", f"data.cache={mode}",
                   "--set", f"train.batch_size={args.batch_size}",
                   "--set", f"train.epochs_per_stage={args.train_epochs}",
                   "--set", 'model.blocks=[{"width": 32}]', "--set", "export.enabled=false"]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"training with data.cache={mode} failed:\n{result.stderr}")
        with open(RunDir(run).metrics, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    return {"wall_seconds": wall, "epoch_seconds": [r["seconds"] for r in records],
            "images_per_second": [r["images_per_second"] for r in records]}


def print_table(report):
    print(f"{report['folder']}: {report['files']} files, image_size {report['image_size']}, "
          f"augment {report['augment']}, batch {report['batch_size']}; "
          f"{report['machine']['cpu']}, {report['machine']['cores']} cores")
    print(f"{'data.cache':>10}  {'first pass s':>12}  {'pipeline epochs s':>24}  "
          f"{'train epochs s':>18}")
    for mode in MODES:
        p, t = report["pipeline"][mode], report["training"].get(mode)
        train = " ".join(f"{s:.1f}" for s in t["epoch_seconds"]) if t else "-"
        print(f"{mode:>10}  {p['first_pass_seconds']:>12.1f}  "
              f"{' '.join(f'{s:.2f}' for s in p['epoch_seconds']):>24}  {train:>18}")
    for key, value in report["ratios"].items():
        print(f"{key}: {value:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder
        if folder is None:
            folder = os.path.join(scratch, "photos")
            print(f"writing {args.make} photo-sized JPEGs to {folder}", file=sys.stderr)
            make_photos(folder, args.make)
        elif not os.path.isdir(folder):
            raise KgreedyError("folder", "is not a directory", folder)
        files = sum(len(f) for _, _, f in os.walk(folder))
        pipeline = {m: pipeline_figures(folder, args, m) for m in MODES}
        training = ({m: training_figures(folder, args, m) for m in MODES}
                    if args.train_epochs > 0 else {})
    later = {m: float(np.median(pipeline[m]["epoch_seconds"][1:] or
                                pipeline[m]["epoch_seconds"])) for m in MODES}
    ratios = {"pipeline epochs after the first, none / memory":
              later["none"] / later["memory"]}
    if training:
        epoch = {m: float(np.median(training[m]["epoch_seconds"])) for m in MODES}
        ratios["training epoch, none / memory"] = epoch["none"] / epoch["memory"]
    import tensorflow as tf  # the pipeline runs have loaded it

    report = {"folder": args.folder or f"--make {args.make}", "files": files,
              "image_size": args.image_size, "augment": args.augment,
              "batch_size": args.batch_size,
              "machine": machine(tensorflow=tf.__version__,
                                 python=platform.python_version()),
              "pipeline": pipeline, "training": training, "ratios": ratios}
    print_table(report)
    if args.json:
        write_json(args.json, report)
    return cli.EXIT_OK


def run_main(argv=None):
    """`main` with kgreedy's exit statuses and one-line errors."""
    raise SystemExit(cli.run(main, argv))


if __name__ == "__main__":
    run_main()

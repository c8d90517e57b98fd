"""Time to accuracy: when each run first reached given eval accuracies, counted in
CPU (or wall) seconds and data passes, and its eval accuracy against that clock.

    python tools/time_to_accuracy.py RUN_DIR [RUN_DIR ...] [--target 0.6 --target 0.7 ...]
        [--clock cpu|wall] [--json OUT.json] [--plot OUT.png]

The clock is the running sum, over the epoch records of RUN_DIR/metrics.jsonl in
file order (stages in order), of `cpu_seconds` (this process's CPU seconds of the
epoch, training and evaluation) or, with `--clock wall`, `wall_seconds`. A target
is reached at the first epoch whose val_accuracy is at least the target. Prints a
Markdown table, one row per run; `--json` writes the same figures and each run's
curve, `--plot` draws the curves. Bad input is one `kgreedy: error:` line on
stderr and exit status 2, before anything is written.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kgreedy import cli  # noqa: E402
from kgreedy.base.errors import KgreedyError  # noqa: E402
from kgreedy.base.files import read_json, read_jsonl, write_json  # noqa: E402

CLOCKS = {"cpu": "cpu_seconds", "wall": "wall_seconds"}


def target(text):
    """argparse type: an accuracy in (0, 1], else the one-line usage error."""
    try:
        value = float(text)
    except ValueError:
        value = None
    # `not 0 < value` also rejects NaN, which every comparison fails.
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an accuracy in (0, 1]; received {text!r}")
    return value


def output_path(text):
    """argparse type: a file path whose directory exists, checked before any work so
    that a bad path fails with nothing written."""
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"must be a file in an existing directory; "
                                         f"received {text!r}")
    return text


def read_records(run_dir):
    """The epoch records of `run_dir`/metrics.jsonl, in file order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise KgreedyError("RUN_DIR", "not a run directory (no metrics.jsonl)", run_dir)
    return read_jsonl(path, "RUN_DIR")


def check_clock(run_dir, records, clock):
    """Raises a `KgreedyError` that says which clock a run's records do have."""
    key, other = CLOCKS[clock], "wall" if clock == "cpu" else "cpu"
    missing = next((r for r in records if r.get(key) is None), None)
    if missing is None:
        return
    where = (f"metrics.jsonl's stage {missing.get('stage')} epoch {missing.get('epoch')} "
             f"has no {key}")
    if all(r.get(CLOCKS[other]) is not None for r in records):
        raise KgreedyError("RUN_DIR", f"{where} (recorded before the field existed); "
                           f"use --clock {other}", run_dir)
    raise KgreedyError("RUN_DIR", f"{where} or {CLOCKS[other]}: the run predates "
                       f"per-epoch timing", run_dir)


def run_figures(run_dir, targets, clock):
    """Reads and checks one run directory; returns its row of figures."""
    records = read_records(run_dir)
    if not any(r.get("val_accuracy") is not None for r in records):
        raise KgreedyError("RUN_DIR", f"no epoch in metrics.jsonl has a val_accuracy "
                           f"({len(records)} epoch records)", run_dir)
    check_clock(run_dir, records, clock)
    path = os.path.join(run_dir, "recipe.json")
    recipe = read_json(path, kind="recipe file")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("train", {}), dict):
        raise KgreedyError(path, "is not a recipe (a JSON object with a train object)",
                           recipe)
    train = recipe.get("train", {})
    seconds, curve, reached = 0.0, [], [None] * len(targets)
    for passes, record in enumerate(records, start=1):
        seconds += record[CLOCKS[clock]]
        accuracy = record.get("val_accuracy")
        if accuracy is None:  # an epoch without eval still costs time and a pass
            continue
        curve.append([seconds, accuracy])
        for i, level in enumerate(targets):
            if reached[i] is None and accuracy >= level:
                reached[i] = {"target": level, "stage": record["stage"],
                              "epoch": record["epoch"], "data_passes": passes,
                              "seconds": seconds}
    return {"run": os.path.basename(os.path.normpath(run_dir)),
            "recipe": recipe.get("name"), "mode": train.get("mode"),
            "precision": train.get("mixed_precision", "none"),
            "data_passes": len(records), "final_accuracy": curve[-1][1],
            "best_accuracy": max(a for _, a in curve), "seconds": seconds,
            "reached": reached, "curve": curve}


def level(value):
    """A target as a column heading: two decimals unless it has more."""
    return f"{value:.2f}" if round(value, 2) == value else f"{value:g}"


def markdown(rows, targets, clock):
    """The rows as a Markdown table."""
    heads = ["run", "mode", "precision", "data passes", "final val acc",
             f"{'CPU' if clock == 'cpu' else 'wall'} s (total)",
             *(f"≥ {level(t)}" for t in targets)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["run"], str(r["mode"]), str(r["precision"]), f"{r['data_passes']:,}",
                 f"{r['final_accuracy']:.4f}", f"{r['seconds']:,.0f}"]
        cells += ["–" if hit is None else
                  f"{hit['seconds']:,.0f} s (stage {hit['stage']} epoch {hit['epoch']})"
                  for hit in r["reached"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, targets, clock, path):
    """Draws eval accuracy against the clock, one curve per run, and saves it
    atomically to `path`."""
    from matplotlib.figure import Figure

    from kgreedy.analysis.report import save_png

    figure = Figure(figsize=(8, 4.5))
    ax = figure.add_subplot()
    for r in rows:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, "-o", markersize=3, linewidth=1.2, label=r["run"])
    for value in targets:
        ax.axhline(value, color="grey", linestyle="--", linewidth=0.7)
    what = "CPU seconds (this process)" if clock == "cpu" else "wall seconds"
    ax.set_xlabel(f"cumulative {what}, training + evaluation")
    ax.set_ylabel("eval accuracy")
    ax.set_title("eval accuracy against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(figure, path)


def main(argv=None):
    parser = cli.ArgumentParser(prog="python tools/time_to_accuracy.py",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--target", type=target, action="append", default=[],
                        help="an eval accuracy in (0, 1]; repeat for more columns")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="sum each epoch's cpu_seconds (default) or wall_seconds")
    parser.add_argument("--json", type=output_path, help="also write the figures here")
    parser.add_argument("--plot", type=output_path, help="draw the curves into this PNG")
    args = parser.parse_args(argv)
    targets = sorted(set(args.target))
    # Every run is read and checked before anything is printed or written.
    rows = [run_figures(run, targets, args.clock) for run in args.runs]
    print(markdown(rows, targets, args.clock))
    if args.json:
        write_json(args.json, {"clock": args.clock, "targets": targets, "runs": rows})
    if args.plot:
        plot(rows, targets, args.clock, args.plot)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))

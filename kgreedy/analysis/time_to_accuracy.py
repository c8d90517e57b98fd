"""Time to accuracy: when each run first reached given eval accuracies, counted in
CPU (or wall) seconds and data passes, and its eval accuracy against that clock
(`tools/time_to_accuracy.py` is its command line).

The clock is the running sum, over the epoch records of RUN_DIR/metrics.jsonl in
file order (stages in order), of `cpu_seconds` (this process's CPU seconds of the
epoch, training and evaluation) or `wall_seconds`. A target is reached at the first
epoch whose val_accuracy is at least the target; an epoch without eval still costs
its time and a data pass.
"""

import os

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import read_json, read_jsonl
from kgreedy.training.rundir import RunDir

CLOCKS = {"cpu": "cpu_seconds", "wall": "wall_seconds"}


def read_records(run_dir):
    """The epoch records of `run_dir`/metrics.jsonl, in file order."""
    path = os.path.join(run_dir, RunDir.METRICS)
    if not os.path.isfile(path):
        raise KgreedyError("RUN_DIR", f"not a run directory (no {RunDir.METRICS})", run_dir)
    return read_jsonl(path, "RUN_DIR")


def check_clock(run_dir, records, clock):
    """Raises a `KgreedyError` that says which clock a run's records do have."""
    key, other = CLOCKS[clock], "wall" if clock == "cpu" else "cpu"
    missing = next((r for r in records if r.get(key) is None), None)
    if missing is None:
        return
    where = (f"{RunDir.METRICS}'s stage {missing.get('stage')} epoch "
             f"{missing.get('epoch')} has no {key}")
    if all(r.get(CLOCKS[other]) is not None for r in records):
        raise KgreedyError("RUN_DIR", f"{where} (recorded before the field existed); "
                           f"use --clock {other}", run_dir)
    raise KgreedyError("RUN_DIR", f"{where} or {CLOCKS[other]}: the run predates "
                       f"per-epoch timing", run_dir)


def run_figures(run_dir, targets, clock):
    """Reads and checks one run directory; returns its row of figures."""
    records = read_records(run_dir)
    if not any(r.get("val_accuracy") is not None for r in records):
        raise KgreedyError("RUN_DIR", f"no epoch in {RunDir.METRICS} has a val_accuracy "
                           f"({len(records)} epoch records)", run_dir)
    check_clock(run_dir, records, clock)
    path = os.path.join(run_dir, RunDir.RECIPE)
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


def figures(run_dirs, targets, clock):
    """Every run's figures, each run read and checked before the next.

    Args:
        run_dirs: run directories written by `kgreedy.train`.
        targets: eval accuracies in (0, 1]; sorted, repeats dropped.
        clock: `cpu` or `wall` (a key of `CLOCKS`).

    Returns:
        {"clock", "targets", "runs": one `run_figures` row per run}.

    Raises:
        KgreedyError: a run without metrics.jsonl, without any val_accuracy, without
            the clock's field, or without a readable recipe.json.
    """
    targets = sorted(set(targets))
    return {"clock": clock, "targets": targets,
            "runs": [run_figures(run, targets, clock) for run in run_dirs]}


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

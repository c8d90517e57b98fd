"""Tabulates finished runs side by side: accuracy (last head and head ensemble),
parameters, data passes, time and throughput. docs/RESULTS.md is its output.

    python tools/results_table.py RUN_DIR [RUN_DIR ...] [--json OUT.json]

Each run's heads are scored again on its eval split (`kgreedy.ensemble`), so runs
trained before the ensemble was reported get the same columns. Times and images/s
are read from the run's metrics.jsonl and summary.json: they are what the run
measured, on the machine it ran on (named in the output).
"""

import argparse
import os
import platform
import sys


def run_row(run_dir):
    """One table row for a finished run directory."""
    from kgreedy import data
    from kgreedy.analysis.report import read_run
    from kgreedy.model.ensemble import evaluate_heads
    from kgreedy.training.rundir import load_trained

    files = read_run(run_dir)
    summary, epochs = files["summary"], files["metrics"]
    recipe, spec, net, _ = load_trained(run_dir)
    images = sum(e["images_per_second"] * e["seconds"] for e in epochs)
    train_seconds = sum(e["seconds"] for e in epochs)
    # Greedy and decoupled runs train every head; end to end only the last.
    every_head = recipe.train.mode != "end_to_end"
    row = {"run": os.path.basename(os.path.normpath(run_dir)), "recipe": recipe.name,
           "mode": recipe.train.mode, "k": recipe.aux.k,
           "stages": len(summary["stages"]),
           "data_passes": len(epochs),
           "last_head_accuracy": summary["final"]["val_accuracy"],
           "ensemble_accuracy": None, "head_accuracies": None,
           "deployed_params": summary["final"]["deployed_params"],
           "train_seconds": train_seconds, "total_seconds": summary["final"]["seconds"],
           "images_per_second": images / train_seconds if train_seconds else None}
    if every_head:
        datasets = data.load(recipe.data, spec, batch_size=recipe.train.batch_size,
                             eval_batch_size=recipe.train.eval_batch_size, seed=recipe.seed)
        scores = evaluate_heads(net, datasets.eval)
        row["ensemble_accuracy"] = scores["ensemble_val_accuracy"]
        row["head_accuracies"] = scores["head_val_accuracies"]
    return row


def markdown(rows):
    """The rows as a Markdown table."""
    lines = ["| run | mode | k | data passes | last head | ensemble | heads 1..J | "
             "deployed params | train time | total time | images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ens = "–" if r["ensemble_accuracy"] is None else f"{r['ensemble_accuracy']:.4f}"
        heads = ("–" if r["head_accuracies"] is None
                 else " / ".join(f"{a:.3f}" for a in r["head_accuracies"]))
        lines.append(
            f"| {r['run']} | {r['mode']} | {r['k']} | {r['data_passes']} | "
            f"{r['last_head_accuracy']:.4f} | {ens} | {heads} | {r['deployed_params']:,} | "
            f"{r['train_seconds'] / 60:.1f} min | {r['total_seconds'] / 60:.1f} min | "
            f"{r['images_per_second']:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--json", help="also write the rows and the machine here")
    args = parser.parse_args(argv)
    from kgreedy.training.rundir import RunDir

    for run in args.runs:
        if not os.path.isfile(RunDir(run).summary):
            parser.error(f"not a finished run directory (no {RunDir.SUMMARY}): {run}")
    rows = [run_row(run) for run in args.runs]
    import tensorflow as tf

    from kgreedy.base.machine import machine

    info = machine(tensorflow=tf.__version__, python=platform.python_version())
    print(f"Machine: {info['cpu']}, {info['cores']} cores; TensorFlow {info['tensorflow']}, "
          f"Python {info['python']}\n")
    print(markdown(rows))
    if args.json:
        from kgreedy.base.files import write_json

        write_json(args.json, {"machine": info, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A run's training curves and accuracy-vs-depth plots, and a Markdown report.

Reads RUN_DIR's recipe.json (a `kgreedy.fit` run's fit.json instead), metrics.jsonl,
summary.json and, when present, probes.json (`kgreedy.probe`), and writes into the output directory (default
RUN_DIR/report/):

- `loss.png`, `accuracy.png`, `learning_rate.png`: train/val curves over the run's
  epochs, one colour per stage, dotted lines at stage boundaries;
- `modules.png` (decoupled runs): each module's head accuracy per epoch;
- `depth.png`: each stage's head accuracy, the probe accuracy of each module (a
  block, or a module of a split model) and the ensemble accuracy, against depth;
- `report.md`: the recipe, the plots and a per-stage table (its figures, the peak
  memory among them, are `stage_rows`).

Every file is written atomically (temporary file, then a rename). Plotting uses
matplotlib's Agg canvas directly, never pyplot, so it needs no display and leaves
no global state behind in the calling process.

"""

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import read_json, read_jsonl, write_atomic, write_text
from kgreedy.training.rundir import RunDir, fit_settings

PLOTS = ("loss", "accuracy", "learning_rate", "depth")


# ------------------------------------------------------------------- files ----

def _read_metrics(path):
    records = read_jsonl(path, "run_dir")
    if not records:
        raise KgreedyError("run_dir", "metrics.jsonl has no epoch records yet", path)
    return records


def read_run(run_dir):
    """Reads what a report needs from a run directory.

    Args:
        run_dir: a run directory written by `kgreedy.train` or `kgreedy.fit`.

    Returns:
        A dict with `recipe` (the raw recipe.json; for a `kgreedy.fit` run, its
        name, mode and modules from fit.json), `metrics` (a list of epoch
        records), `summary` and `probes` (None without probes.json).

    Raises:
        KgreedyError: the directory, or one of the files it must hold, is missing
            or unreadable.
    """
    if not os.path.isdir(run_dir):
        raise KgreedyError("run_dir", "is not a directory", run_dir)
    # Paths as the caller gave the folder (not RunDir's absolute ones): messages
    # name them so.
    paths = {name: os.path.join(run_dir, name)
             for name in (RunDir.RECIPE, RunDir.METRICS, RunDir.SUMMARY, RunDir.PROBES)}
    fit = fit_settings(run_dir)  # None: a run of kgreedy.train, with recipe.json
    for name in (*(() if fit else (RunDir.RECIPE,)), RunDir.METRICS, RunDir.SUMMARY):
        if not os.path.isfile(paths[name]):
            raise KgreedyError("run_dir", f"not a kgreedy run directory with results: "
                               f"{name} is missing"
                               + (f" (nor is there a kgreedy.fit run's {RunDir.FIT})"
                                  if name == RunDir.RECIPE else ""), run_dir)
    summary = read_json(paths[RunDir.SUMMARY], RunDir.SUMMARY)
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list):
        raise KgreedyError(RunDir.SUMMARY, "has no 'stages' list", paths[RunDir.SUMMARY])
    probes = (read_json(paths[RunDir.PROBES], RunDir.PROBES)
              if os.path.isfile(paths[RunDir.PROBES]) else None)
    recipe = (_fit_as_recipe(fit, RunDir(run_dir).fit) if fit
              else read_json(paths[RunDir.RECIPE], RunDir.RECIPE))
    return {"recipe": recipe,
            "metrics": _read_metrics(paths[RunDir.METRICS]),
            "summary": summary, "probes": probes}


def _fit_as_recipe(settings, path):
    """What a report shows of a recipe, from a `kgreedy.fit` run's fit.json: its
    name, mode and modules (a fit run has no recipe; its model was the caller's)."""
    stages = settings.get("stages")
    if not isinstance(stages, list) or not stages:
        raise KgreedyError(RunDir.FIT, "has no 'stages' list", path)
    name = settings.get("name", "?")
    return {"name": name,
            "description": f"A kgreedy.fit run of the Keras model {name}, split into "
                           f"{len(stages)} modules.",
            "train": {"mode": settings["mode"]},
            # `trunk` reads a split model's source from its architecture's name.
            "model": {"modules": len(stages), "architecture": name}}


def save_png(figure, path):
    """Renders a matplotlib `Figure` to `path` as a PNG, atomically.

    Args:
        figure: a `matplotlib.figure.Figure` (not tied to pyplot).
        path: the PNG file; its directory must exist.
    """
    FigureCanvasAgg(figure)  # attaches the headless Agg canvas to the figure
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100,
                                                bbox_inches="tight"), binary=True)


# ------------------------------------------------------------------- plots ----

def _figure():
    figure = Figure(figsize=(7, 4))
    return figure, figure.add_subplot()


def _curves_figure(metrics, keys, ylabel, title, log_y=False):
    """One figure of per-epoch `keys` (solid first, dashed second) over the run's
    epochs; each stage has its own colour and its first epoch starts a new span."""
    figure, ax = _figure()
    stages = sorted({r["stage"] for r in metrics})
    colours = {s: f"C{i % 10}" for i, s in enumerate(stages)}
    styles = (("-", "o"), ("--", "x"))
    position = 0
    for stage in stages:
        records = [r for r in metrics if r["stage"] == stage]
        xs = list(range(position + 1, position + len(records) + 1))
        if position:
            ax.axvline(position + 0.5, color="grey", linestyle=":", linewidth=1)
        for key, (style, marker) in zip(keys, styles):
            points = [(x, r[key]) for x, r in zip(xs, records) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, marker=marker if len(points) < 30 else None,
                        markersize=4, color=colours[stage],
                        label=f"stage {stage} {key.replace('_', ' ')}")
        position += len(records)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (all stages in order)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(stages) > 1 else 1)
    return figure


def head_accuracies(summary):
    """{stage: head val_accuracy} of the stages in summary.json; heads scored only at
    the end (a decoupled run's one stage trains every head) from the final scores."""
    heads = dict(enumerate((summary.get("final") or {}).get("head_val_accuracies")
                           or (), start=1))
    heads.update({s["stage"]: s.get("val_accuracy") for s in summary.get("stages", [])})
    return heads


def modules_figure(metrics):
    """A decoupled run's per-module val (solid) and train (dotted) accuracy per epoch,
    one colour per module."""
    figure, ax = _figure()
    records = [r for r in metrics if r.get("val_module_accuracy") is not None]
    xs = list(range(1, len(records) + 1))
    for j in range(len(records[0]["val_module_accuracy"]) if records else 0):
        ax.plot(xs, [r["val_module_accuracy"][j] for r in records], "-", color=f"C{j % 10}",
                marker="o" if len(xs) < 30 else None, markersize=4,
                label=f"module {j + 1} val")
        if records[0].get("train_module_accuracy") is not None:
            ax.plot(xs, [r["train_module_accuracy"][j] for r in records], ":",
                    color=f"C{j % 10}", alpha=0.7, label=f"module {j + 1} train")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("each module's head (solid: val, dotted: train)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return figure


def ensemble_accuracy(summary):
    """summary["final"]["ensemble_val_accuracy"], or None."""
    return (summary.get("final") or {}).get("ensemble_val_accuracy")


def depth_figure(summary, probes=None, unit=None):
    """Accuracy against depth: each stage's head val accuracy, the linear probe's eval
    (and train, dotted) accuracy of each module from `probes` (probes.json), and
    the ensemble's val accuracy as a horizontal line.

    Args:
        summary: the run's summary.json.
        probes: probes.json, or None.
        unit: what the trunk's pieces are called on the x axis, "block" or
            "module" (default: the probes' "unit", else "block").

    Returns:
        A `matplotlib.figure.Figure`.
    """
    figure, ax = _figure()
    heads = {j: a for j, a in head_accuracies(summary).items() if a is not None}
    depths = set(heads)
    if probes:
        blocks = probes["blocks"]
        depths |= {b["block"] for b in blocks}
        xs = [b["block"] for b in blocks]
        ax.plot(xs, [b["probe_eval_accuracy"] for b in blocks], "-o", color="C0",
                label="linear probe, eval")
        ax.plot(xs, [b["probe_train_accuracy"] for b in blocks], ":", marker=".",
                color="C0", alpha=0.6, label="linear probe, train")
    if heads:
        ax.plot(sorted(heads), [heads[j] for j in sorted(heads)], "-s", color="C1",
                label="auxiliary head (val)")
    ensemble = ensemble_accuracy(summary)
    if ensemble is not None:
        ax.axhline(ensemble, color="C2", linestyle="--", label="ensemble of heads (val)")
    if depths:
        ax.set_xticks(sorted(depths))
    unit = unit or (probes or {}).get("unit") or "block"
    ax.set_xlabel(f"{unit} (depth)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs depth")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to name without validation data
        ax.legend(fontsize="small")
    return figure


def exits_figure(summary):
    """Accuracy against mean MFLOPs per image of the early-exit export
    (summary.json's `final.early_exit`), on the held-out evaluation examples: one
    point per threshold setting of the calibration's front, the served setting and
    the last head marked, each head alone at its cost, the ensemble as a line."""
    final = summary.get("final") or {}
    plan = final["early_exit"]
    held = plan["held_out"]
    figure, ax = _figure()
    curve = sorted(plan["curve"], key=lambda p: p["mean_mflops"])
    ax.plot([p["mean_mflops"] for p in curve], [p["accuracy"] for p in curve], "-o",
            markersize=3, color="C0", label="threshold settings (held out)")
    heads = head_accuracies(summary)
    if heads:
        ax.plot(plan["exit_mflops"], [heads.get(j + 1) for j in range(len(plan["exit_mflops"]))],
                "s", color="C1", label="each head alone (all eval)")
    ax.plot([plan["full_mflops"]], [held["last_head_accuracy"]], "D", color="C3",
            markersize=8, label="last head (held out)")
    ax.plot([held["mean_mflops"]], [held["accuracy"]], "*", color="C2", markersize=14,
            label=f"served: thresholds {', '.join(f'{t:.2f}' for t in plan['thresholds'][:-1])}")
    ensemble = ensemble_accuracy(summary)
    if ensemble is not None:
        ax.axhline(ensemble, color="C4", linestyle="--", label="ensemble of heads (all eval)")
    ax.set_xlabel("mean MFLOPs per image")
    ax.set_ylabel("accuracy")
    ax.set_title("early exits: accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def write_plots(run, output):
    """Writes the report's PNGs into `output`; returns {plot name: file name}."""
    metrics = run["metrics"]
    figures = {
        "loss": _curves_figure(metrics, ("train_loss", "val_loss"), "loss",
                               "loss (solid: train, dashed: val)", log_y=True),
        "accuracy": _curves_figure(metrics, ("train_accuracy", "val_accuracy"), "accuracy",
                                   "accuracy (solid: train, dashed: val)"),
        "learning_rate": _curves_figure(metrics, ("learning_rate",), "learning rate",
                                        "learning rate"),
        "depth": depth_figure(run["summary"], run["probes"], trunk(run["recipe"])[1]),
    }
    names = list(PLOTS)
    if any(r.get("val_module_accuracy") is not None for r in metrics):
        figures["modules"] = modules_figure(metrics)  # a decoupled run
        names.insert(2, "modules")
    if (run["summary"].get("final") or {}).get("early_exit"):
        figures["exits"] = exits_figure(run["summary"])
        names.append("exits")
    for name in names:
        save_png(figures[name], os.path.join(output, f"{name}.png"))
    return {name: f"{name}.png" for name in names}


# ---------------------------------------------------------------- markdown ----

def _number(value, fmt):
    return "-" if value is None else format(value, fmt)


def _shape(shape):
    return "x".join(map(str, shape)) if shape else "-"


def stage_rows(summary, metrics):
    """Per stage of summary.json: its entry (`peak_memory_mb`, `gpu_peak_memory_mb`
    among its figures: None in runs older than them) plus `images_per_second`, the
    mean of its epochs' images/s in metrics.jsonl (None without records)."""
    rows = []
    for entry in summary["stages"]:
        speeds = [r["images_per_second"] for r in metrics
                  if r["stage"] == entry["stage"] and r.get("images_per_second")]
        rows.append({**entry, "images_per_second":
                     sum(speeds) / len(speeds) if speeds else None})
    return rows


def _table(columns, rows):
    """Markdown table lines; `columns`: (title, key, format) with format None for
    shapes. A missing value shows as '-'."""
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "---:|" * len(columns)]
    for row in rows:
        cells = [_shape(row.get(key)) if fmt is None else _number(row.get(key), fmt)
                 for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_STAGE_COLUMNS = (("stage", "stage", "d"), ("output", "output_shape", None),
                  ("trainable", "trainable_params", ","), ("frozen", "frozen_params", ","),
                  ("deployed", "deployed_params", ","), ("val acc", "val_accuracy", ".4f"),
                  ("train acc", "train_accuracy", ".4f"), ("seconds", "seconds", ".1f"),
                  ("images/s", "images_per_second", ",.0f"),
                  ("peak MB", "peak_memory_mb", ",.0f"))
# Only where a stage was measured on a GPU: on a CPU the column would be all '-'.
_GPU_COLUMN = ("GPU peak MB", "gpu_peak_memory_mb", ",.0f")
_PROBE_COLUMNS = (("{unit}", "block", "d"), ("output", "output_shape", None),
                  ("features", "features", "d"),
                  ("probe train acc", "probe_train_accuracy", ".4f"),
                  ("probe eval acc", "probe_eval_accuracy", ".4f"),
                  ("head val acc", "head_val_accuracy", ".4f"))
_TITLES = {"loss": "Loss", "accuracy": "Accuracy", "learning_rate": "Learning rate",
           "depth": "Accuracy vs depth", "modules": "Each module's head (decoupled)",
           "exits": "Early exits: accuracy vs compute"}


def trunk(recipe):
    """(count, unit, source) of a raw recipe.json's trunk: its blocks ("block",
    source None), or the modules its model is split into ("module", source the
    model: the architecture, keras.applications name or .keras file's name)."""
    model = recipe.get("model") or {}
    if model.get("split_at") is not None or model.get("modules") is not None:
        count = (len(model["split_at"]) + 1 if model.get("split_at") is not None
                 else model["modules"])
        source = (model.get("architecture") or model.get("keras_application")
                  or os.path.basename(model.get("keras_file") or "") or None)
        return count, "module", source
    return len(model.get("blocks") or []), "block", None


def markdown(run, plots):
    """The text of report.md: recipe, tables and the plots (relative links)."""
    recipe, summary, probes = run["recipe"], run["summary"], run["probes"]
    count, unit, source = trunk(recipe)
    lines = [f"# Run report: {recipe.get('name', '?')}", ""]
    if recipe.get("description"):
        lines += [recipe["description"], ""]
    lines += [f"Mode: {recipe.get('train', {}).get('mode', 'greedy')}; "
              f"{count} {unit}s" + (f" of {source}" if source else "")
              + f"; {len(run['metrics'])} epochs recorded.", "", "## Stages", ""]
    rows = stage_rows(summary, run["metrics"])
    gpu = any(r.get("gpu_peak_memory_mb") is not None for r in rows)
    lines += _table(_STAGE_COLUMNS + ((_GPU_COLUMN,) if gpu else ()), rows) + [""]
    if any(r.get("peak_memory_mb") is not None for r in rows):
        since = ("the stage began" if all(r.get("peak_memory_since", "stage") == "stage"
                                          for r in rows)
                 else "the stage began, or the process started where the system "
                      "could not reset it")
        lines += [f"Peak MB: the training process's largest resident memory since {since}"
                  + ("; GPU: TensorFlow's peak on the fullest GPU" if gpu else "")
                  + " (MB of 2^20 bytes).", ""]
    final = summary.get("final")
    if final:
        text = (f"**Final** (stage {final.get('stage')}): val accuracy "
                f"{_number(final.get('val_accuracy'), '.4f')}")
        if final.get("ensemble_val_accuracy") is not None:
            text += f", ensemble val accuracy {final['ensemble_val_accuracy']:.4f}"
        lines.append(text + f"; export {final.get('export_path') or 'none'}; "
                     f"{_number(final.get('seconds'), '.1f')} s in all.")
        plan = final.get("early_exit")
        if plan:
            held = plan["held_out"]
            lines += ["", f"**Early exits** at thresholds "
                      f"{', '.join(f'{t:.3g}' for t in plan['thresholds'][:-1])} (within "
                      f"{plan['max_accuracy_drop']:g} points of the last head where "
                      f"fitted): accuracy {held['accuracy']:.4f} against the last head's "
                      f"{held['last_head_accuracy']:.4f}, {held['mean_mflops']:.4g} of "
                      f"{plan['full_mflops']:.4g} MFLOPs per image, on the "
                      f"{held['examples']} held-out eval examples; answered at heads "
                      f"1..{len(held['exits'])}: "
                      + ", ".join(f"{e:.1%}" for e in held["exits"]) + "."]
    else:
        lines.append("**Final**: not yet (the run has not finished).")
    if probes:
        lines += ["", "## Linear probes", "",
                  f"Logistic regression on each {unit}'s output, average-pooled to "
                  f"{_shape(probes.get('pooled_to'))} and standardised; "
                  f"{probes.get('train_examples')} train and {probes.get('eval_examples')} "
                  "eval examples, without augmentation (`kgreedy.probe`).", ""]
        columns = tuple((title.format(unit=unit), key, fmt)
                        for title, key, fmt in _PROBE_COLUMNS)
        lines += _table(columns, probes["blocks"])
    lines += ["", "## Plots"]
    for name, file in plots.items():
        lines += ["", f"### {_TITLES[name]}", "", f"![{_TITLES[name]}]({file})"]
    return "\n".join(lines) + "\n"


def write_report(run_dir, output=None):
    """Writes the plots and report.md of a run.

    Args:
        run_dir: a run directory written by `kgreedy.train`.
        output: the report directory (default: RUN_DIR/report); created if missing.

    Returns:
        The path of report.md.

    Raises:
        KgreedyError: the run directory lacks what a report needs, or `output` is
            not a directory.
    """
    run = read_run(run_dir)
    output = os.path.abspath(output or RunDir(run_dir).report)
    if os.path.exists(output) and not os.path.isdir(output):
        raise KgreedyError("output", "exists and is not a directory", output)
    os.makedirs(output, exist_ok=True)
    plots = write_plots(run, output)
    path = os.path.join(output, "report.md")
    write_text(path, markdown(run, plots))
    return path

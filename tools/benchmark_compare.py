"""tools/benchmark.py's side-by-side sections: the stage step in other precisions
(`--precisions`) and against the PyTorch reference (`--torch`,
tools/benchmark_torch.py), with the formatting helpers they share with the report.
No TensorFlow here (the parent stays small)."""

from kgreedy.base.errors import KgreedyError
from kgreedy.config.vocabulary import PRECISIONS


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, spec=",.1f"):
    return "-" if value is None else format(value, spec)


def parse_precisions(text):
    """`none,auto` -> ['none', 'auto'], in the order given; None without the flag."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < 2 or len(set(parts)) < len(parts) or not set(parts) <= set(PRECISIONS):
        raise KgreedyError("--precisions", "expected two or more distinct, comma-separated "
                           f"values of {', '.join(PRECISIONS)}", text)
    return parts



def precision_section(stages, precisions, runs):
    """The `precisions` object: each stage's kgreedy step and the end-to-end fit in
    each precision, against the first (whose figures are the plain (kind, stage) runs)."""
    first, rows, resolved, notes = precisions[0], [], {}, {}
    for what, kind, j in [*((f"stage {j}", "kgreedy", j) for j in stages),
                          ("end_to_end", "end_to_end", None)]:
        measured = [runs.get((kind, j) if p == first else (kind, j, p)) or {}
                    for p in precisions]
        first_ips = measured[0].get("images_per_second")
        for p, run in zip(precisions, measured):
            ips = run.get("images_per_second")
            if run:
                resolved.setdefault(p, run.get("precision"))
                notes.setdefault(p, run.get("precision_note"))
            rows.append({"what": what, "stage": j, "precision": p,
                         "resolved": run.get("precision"), "images_per_second": ips,
                         "peak_above_baseline_mb": run.get("peak_above_baseline_mb"),
                         "over_first": ratio(ips, first_ips), "run": run or None})
    return {"compared": precisions, "resolved": {p: resolved.get(p) for p in precisions},
            "notes": {p: notes.get(p) for p in precisions}, "rows": rows}


def print_precisions(section):
    """The `precision` table: one row per (stage or end-to-end fit, precision)."""
    print("precision: images/s of each stage's kgreedy step and of end-to-end fit per "
          f"train.mixed_precision; ratio: over {section['compared'][0]}'s")
    print(f"{'what':<10} {'precision':<15} {'ran as':<15} {'images/s':>9} {'ratio':>6} "
          f"{'peak MB':>8}")
    for r in section["rows"]:
        over = r["over_first"]
        print(f"{'end-to-end' if r['stage'] is None else r['what']:<10} "
              f"{r['precision']:<15} {r['resolved'] or '-':<15} "
              f"{fmt(r['images_per_second']):>9} "
              f"{'-' if over is None else f'{over:.2f}x':>6} "
              f"{fmt(r['peak_above_baseline_mb'], ',.0f'):>8}")
    for note in filter(None, section["notes"].values()):
        print(f"precision: {note}")


def torch_section(stages, runs, reason):
    """The `torch` object: the PyTorch reference per stage against kgreedy's step,
    or why it was not measured (`reason`)."""
    rows = []
    for j in stages:
        theirs, ours = runs.get(("torch", j)) or {}, runs.get(("kgreedy", j)) or {}
        ips = theirs.get("images_per_second")
        rows.append({"stage": j, "torch_images_per_second": ips,
                     "kgreedy_images_per_second": ours.get("images_per_second"),
                     "kgreedy_over_torch": ratio(ours.get("images_per_second"), ips),
                     "kgreedy_precision": ours.get("precision"),
                     "torch_peak_above_baseline_mb": theirs.get("peak_above_baseline_mb"),
                     "run": theirs or None})
    first = next((r["run"] for r in rows if r["run"]), {})
    return {"skipped": reason, "version": first.get("torch"),
            "threads": first.get("torch_threads"),
            "cpu_capability": first.get("torch_cpu_capability"),
            "onednn_max_cpu_isa": first.get("onednn_max_cpu_isa"),
            "rows": [] if reason else rows}


def print_torch(section):
    """One line per stage: the PyTorch reference's images/s and kgreedy's ratio."""
    if section["skipped"]:
        print(f"torch: not measured: {section['skipped']}")
        return
    print(f"torch: PyTorch {section['version'] or '-'} reference stage "
          f"(tools/benchmark_torch.py), {section['threads'] or '-'} threads, kernels "
          f"{section['cpu_capability'] or '-'}, ONEDNN_MAX_CPU_ISA "
          f"{section['onednn_max_cpu_isa'] or 'unset'}")
    for r in section["rows"]:
        print(f"torch: stage {r['stage']}: {fmt(r['torch_images_per_second'])} images/s, "
              f"kgreedy {fmt(r['kgreedy_images_per_second'])} images/s, kgreedy/torch "
              f"{fmt(r['kgreedy_over_torch'], '.2f')}"
              + ("" if r["kgreedy_precision"] in ("none", None) else
                 f" (kgreedy in {r['kgreedy_precision']}, PyTorch in float32: pass "
                 "--set train.mixed_precision=none to compare like with like)"))

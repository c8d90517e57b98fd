"""Checks an exported SavedModel the way TF Serving loads and answers it.

An export can load fine with `tf.saved_model.load` in the training process and still
fail under TF Serving: a wrong tag-set or signature, a malformed warm-up file, a graph
that needs Keras at load time, or one that answers malformed requests instead of
refusing them (TF Serving checks nothing itself). `check` runs, without a TF Serving
binary, every check that would catch one of these, in this order:

1. the layout, the tag-set `serve` and the signatures against the contract in
   docs/serving.md (`kgreedy.serving.signatures`), and the warm-up file
   (`kgreedy.serving.warmup_file`);
2. sample images at the model's input size, the reference outputs of the model loaded
   here, and whether `serve_encoded` of PNG and JPEG files agrees with
   `serving_default` of the same pixels; for an early-exit export, its thresholds
   signatures at the export's thresholds, at 1 (the last head) and at 0 (head 1);
3. the same images sent as tensors, gRPC and REST requests, malformed requests and
   the warm-up records, to a fresh server process without keras or kgreedy
   (`kgreedy.serving.tf_server`), its answers compared with the reference
   (`kgreedy.serving.request_checks`).

A step whose inputs a failed check left missing is skipped: without the `serve`
tag-set there are no signatures to check, and without the contract's signatures
there is nothing to send requests to.
"""

import os

from kgreedy.base.errors import KgreedyError
from kgreedy.serving import request_checks, signatures, warmup_file
from kgreedy.serving.tf_server import run_server


class _Report:
    """Collects one PASS/FAIL line per check."""

    def __init__(self):
        self.lines = []
        self.failed = 0

    def add(self, name, ok, detail=""):
        self.failed += not ok
        self.lines.append(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail
                                                                   else ""))


def _check_arguments(tolerance, seed):
    if not tolerance >= 0:  # also NaN, which no difference is ever <= to
        raise KgreedyError("tolerance", "must be >= 0", tolerance)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise KgreedyError("seed", "must be a non-negative integer", seed)


def _require_serving_api():
    try:
        import tensorflow_serving.apis.predict_pb2  # noqa: F401
    except ImportError:
        raise KgreedyError("tensorflow-serving-api", "is needed to build the requests: "
                           "pip install tensorflow-serving-api") from None


# ------------------------------------------------------------------- steps ----

def _check_files(report, export_dir, saved_model):
    """Step 1: layout, tag-set, signatures, warm-up file.

    Returns:
        (specs, records): the `serve` signatures' specs and the warm-up records; None
        when a failure leaves nothing to send requests to.
    """
    layout = signatures.layout_problems(export_dir)
    version, model = os.path.basename(export_dir), os.path.dirname(export_dir)
    report.add("layout", not layout, "; ".join(layout) or
               f"version {version} of model {os.path.basename(model)}")
    serve = signatures.serve_meta_graphs(saved_model)
    report.add("tag-set 'serve'", bool(serve), "" if serve else "no MetaGraphDef with "
               f"exactly the tag 'serve'; tag-sets: "
               f"{[sorted(m.meta_info_def.tags) for m in saved_model.meta_graphs]}")
    if not serve:
        return None
    meta_graph = serve[0]
    specs = signatures.signature_specs(meta_graph)
    num_classes = signatures.declared_classes(specs)
    contract_ok = True
    for name in signatures.SIGNATURES:
        if name not in specs:
            report.add(f"signature {name}", False, f"missing; signatures: {sorted(specs)}")
            contract_ok = False
            continue
        problems = signatures.contract_problems(
            name, specs[name], meta_graph.signature_def[name].method_name, num_classes)
        report.add(f"signature {name}", not problems, "; ".join(problems) or "as the serving contract")
        contract_ok = contract_ok and not problems
    ok, detail, records = warmup_file.check_warmup_file(export_dir, specs)
    report.add("warm-up file", ok, detail)
    return (specs, records) if contract_ok else None


def _samples(specs, records, seed):
    """Step 2a: sample images of the size `serving_default` takes."""
    shape = specs["serving_default"]["inputs"]["images"]["shape"]
    height, width = warmup_file.model_size(shape, records)
    # (-1, -1, -1, C): the model resizes, so images of another size must work too.
    return request_checks.make_samples(height, width, shape[3], shape[1] == -1, seed)


def _reference(report, export_dir, samples):
    """Step 2b: the outputs of the model loaded here, or None if it does not load.

    Returns:
        {key: outputs}: `pixels`, `png`, `jpeg`, `jpeg pixels` and, for a model that
        resizes, `other pixels` and `other png`; outputs are {name: array}.
    """
    import tensorflow as tf

    s = samples
    try:
        loaded = tf.saved_model.load(export_dir)
        default, encoded = (loaded.signatures[name] for name in signatures.SIGNATURES)

        def numpy(outputs):
            return {k: v.numpy() for k, v in outputs.items()}

        want = {"pixels": numpy(default(images=tf.constant(s.x))),
                "png": numpy(encoded(image_bytes=tf.constant(s.pngs))),
                "jpeg": numpy(encoded(image_bytes=tf.constant(s.jpegs))),
                "jpeg pixels": numpy(default(images=tf.constant(s.jpeg_pixels)))}
        if s.resizes:
            want["other pixels"] = numpy(default(images=tf.constant(s.x_other)))
            want["other png"] = numpy(encoded(image_bytes=tf.constant(s.other_pngs)))
    except (tf.errors.OpError, ValueError, KeyError, OSError) as e:
        report.add("tf.saved_model.load in this process", False, f"{type(e).__name__}: {e}")
        return None
    return want


def _check_encodings(report, samples, want, tolerance):
    """Step 2c: `serve_encoded` of files = `serving_default` of their pixels."""
    _, height, width, channels = samples.pixels.shape
    agreement = request_checks.agreement
    report.add(f"serve_encoded(PNG) = serving_default(same pixels), in memory, "
               f"{height}x{width}x{channels}",
               *agreement(want["png"], want["pixels"], tolerance))
    report.add("serve_encoded(JPEG) = serving_default(decoded JPEG pixels), in memory",
               *agreement(want["jpeg"], want["jpeg pixels"], tolerance))
    if samples.resizes:
        other = samples.other.shape
        report.add(f"serve_encoded(PNG) = serving_default(same pixels), in memory, "
                   f"{other[1]}x{other[2]} (resized)",
                   *agreement(want["other png"], want["other pixels"], tolerance))


def _check_exits(report, export_dir, samples, want):
    """Step 2d, an early-exit export only: the thresholds signatures answer as
    `serving_default` at the export's own thresholds, thresholds of 1 send every
    example to the last head and thresholds of 0 to head 1."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(export_dir)
    missing = [n for n in ("serving_thresholds", "serve_encoded_thresholds")
               if n not in loaded.signatures]
    if missing:
        report.add("early exits: thresholds signatures", False, f"missing {missing}")
        return
    own = loaded.early_exit_thresholds[0].numpy()
    by_pixels, by_files = (loaded.signatures[n] for n in ("serving_thresholds",
                                                         "serve_encoded_thresholds"))
    x, pngs = tf.constant(samples.x), tf.constant(samples.pngs)

    def stages(fn, inputs, thresholds):
        return fn(**inputs, thresholds=tf.constant(thresholds, tf.float32))

    same = stages(by_pixels, {"images": x}, own)
    report.add(f"early exits: serving_thresholds at the export's thresholds {own.tolist()} "
               "= serving_default", *request_checks.agreement(
                   {k: v.numpy() for k, v in same.items()}, want["pixels"], 0.0))
    heads = len(own)
    for value, head in ((1.0, heads), (0.0, 1)):
        got = [stages(fn, inputs, [value] * heads)["exit_stage"].numpy()
               for fn, inputs in ((by_pixels, {"images": x}), (by_files, {"image_bytes": pngs}))]
        ok = all(np.array_equal(g, np.full(len(samples.x), head)) for g in got)
        report.add(f"early exits: thresholds of {value:g} answer every example at head "
                   f"{head}", ok, "" if ok else f"exit_stage {[g.tolist() for g in got]}")


def _check_server(report, export_dir, samples, want, tolerance):
    """Step 3: every request in a fresh server process, against the reference."""
    model = os.path.basename(os.path.dirname(export_dir)) or "model"
    cases = request_checks.cases(samples, model)
    refusals = request_checks.refusals(samples, model)
    requests = ([request for _, request, _, _ in cases] + [r for _, r in refusals]
                + [request_checks.warmup_request(warmup_file.warmup_path(export_dir))])
    answers, modules, error = run_server(export_dir, requests)
    report.add("server process: TF1 session loader, tag 'serve', no keras or kgreedy",
               error is None and modules == [],
               error or (f"imported {modules}" if modules else "loaded"))
    answers = answers or [None] * len(requests)
    for (name, _, read, key), answer in zip(cases, answers):
        report.add(name, *request_checks.agreement(read(answer), want[key], tolerance))
    for (name, _), answer in zip(refusals, answers[len(cases):]):
        report.add(name, *request_checks.refusal(answer))
    warmup = answers[-1]
    replayed = (warmup or {}).get("records")
    bad = [r for r in replayed or [] if "error" in r]
    report.add("warm-up records run in the server", bool(replayed) and not bad,
               (f"{len(replayed)} records ran" if replayed and not bad else
                f"{bad[0].get('signature')}: {bad[0]['error'][:300]}" if bad else
                str((warmup or {}).get("error", "no records"))[:300]))


def _finish(report, out):
    out("Checks:")
    for line in report.lines:
        out(line)
    total = len(report.lines)
    out(f"{total - report.failed} of {total} checks passed" if report.failed
        else f"all {total} checks passed")
    return report.failed


# ---------------------------------------------------------------- the check ----

def check(export_dir, tolerance=1e-4, seed=0, out=print):
    """Runs every check on the version directory `export_dir`.

    Prints the SavedModel's listing (as `saved_model_cli show --all`), then one
    `PASS  name[: detail]` or `FAIL  name: detail` line per check and a summary line.

    Args:
        export_dir: RUN_DIR/export/MODEL_NAME/VERSION.
        tolerance: largest accepted difference of probabilities.
        seed: seeds the random sample pixels.
        out: prints the listing and the summary lines.

    Returns:
        The number of failed checks.

    Raises:
        KgreedyError: about `export_dir` when it is not a SavedModel, about `tolerance`
            or `seed` when out of range, or when tensorflow-serving-api is missing.
    """
    _check_arguments(tolerance, seed)
    export_dir = os.path.abspath(export_dir)
    saved_model = signatures.read_saved_model(export_dir)
    _require_serving_api()
    out(signatures.show_all(saved_model))
    report = _Report()
    found = _check_files(report, export_dir, saved_model)
    if found is None:
        return _finish(report, out)
    samples = _samples(*found, seed)
    want = _reference(report, export_dir, samples)
    if want is not None:
        _check_encodings(report, samples, want, tolerance)
        if "exit_stage" in want["pixels"]:
            _check_exits(report, export_dir, samples, want)
        _check_server(report, export_dir, samples, want, tolerance)
    return _finish(report, out)

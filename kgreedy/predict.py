"""Classifies image files with an exported SavedModel.

    python -m kgreedy.predict EXPORT_DIR IMAGE... [--top-k K] [--json]

EXPORT_DIR is a version directory (RUN_DIR/export/MODEL_NAME/VERSION) or a model base
path, of which the newest version is used, as TF Serving does. Each PNG or JPEG file
goes through the `serve_encoded` signature (`tf.saved_model.load`: neither Keras nor
kgreedy's training code is needed); the output is its top K classes with their
probabilities, or JSON with `--json`. A file that cannot be read or decoded gets one
`kgreedy: error:` line on stderr; the others are still answered, and the exit status
is 2 if any file was bad. Only regular files are opened (a named pipe would block),
and a file whose header declares more pixels than `--max-pixels` (default: the limit
saved with the export, `data.max_pixels`, else 64,000,000) is refused unread.
"""

import sys

if __name__ == "__main__":  # first: filters TensorFlow's C++ start-up lines (kgreedy.quiet)
    from kgreedy import quiet
    quiet.install(sys.argv[1:])

import json
import os
import re

from kgreedy import cli
from kgreedy.base.errors import KgreedyError
from kgreedy.serving.versions import existing_versions


def _model_dir(path):
    """The version directory to load: `path` itself, or its newest version."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [v for v in existing_versions(path)
                if os.path.isfile(os.path.join(path, str(v), "saved_model.pb"))]
    if not versions:
        raise KgreedyError("EXPORT_DIR", "not an exported model: neither a version "
                           "directory with saved_model.pb nor a model base path with "
                           "versions", path)
    return os.path.join(path, str(versions[-1]))


def _reason(error):
    """The line of a TensorFlow error that says what is wrong (not where)."""
    lines = [line.strip() for line in error.message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(
        ("Graph execution error", "Detected at node", "<stack traces", "[["))]
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", (useful or lines or ["?"])[0])


def main(argv=None):
    """`python -m kgreedy.predict EXPORT_DIR IMAGE... [--top-k K] [--json]`."""
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.predict",
        description="Classify PNG or JPEG files with an exported SavedModel and print "
                    "the top classes with their probabilities.")
    parser.add_argument("export_dir", metavar="EXPORT_DIR",
                        help="version directory, or model base path (newest version)")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files")
    parser.add_argument("--top-k", type=int, default=3, metavar="K",
                        help="classes to print per file (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--max-pixels", type=cli.positive_int, default=None, metavar="N",
                        help="refuse images whose header declares more pixels (default: "
                             "the export's data.max_pixels, else 64,000,000)")
    cli.add_verbose(parser)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise KgreedyError("--top-k", "must be a positive integer", args.top_k)
    model_dir = _model_dir(args.export_dir)

    import tensorflow as tf  # after the checks: a bad path gives one line, fast

    from kgreedy.data.folders import file_problem, printable
    from kgreedy.data.images import size_problem
    from kgreedy.serving.export import DEFAULT_MAX_PIXELS

    try:
        model = tf.saved_model.load(model_dir)
        classify = model.signatures["serve_encoded"]
    except (OSError, ValueError, KeyError, tf.errors.OpError) as e:
        raise KgreedyError("EXPORT_DIR", f"cannot load serve_encoded from {model_dir} "
                           f"({type(e).__name__}: {e})", args.export_dir) from None
    # Exports keep every class name beside the signatures, which name the top one only.
    names = getattr(model, "class_names", None)
    names = [n.decode() for n in names[0].numpy()] if names else None
    saved = getattr(model, "max_pixels", None)  # exports before the limit have none
    max_pixels = args.max_pixels or (int(saved[0].numpy()) if saved else DEFAULT_MAX_PIXELS)

    results, bad = [], 0
    for path in args.images:
        problem = file_problem(path)
        if problem is not None:
            print(f"kgreedy: error: {path}: {problem}", file=sys.stderr)
            bad += 1
            continue
        try:
            with open(path, "rb") as f:
                contents = f.read()
            problem = size_problem(contents, max_pixels)
            if problem is not None:
                print(f"kgreedy: error: {path}: not an image this model can read: "
                      f"{problem.replace('data.max_pixels', '--max-pixels')}",
                      file=sys.stderr)
                bad += 1
                continue
            out = classify(image_bytes=tf.constant([contents]))
        except OSError as e:
            print(f"kgreedy: error: {path}: cannot read: {e.strerror or e}", file=sys.stderr)
            bad += 1
            continue
        except tf.errors.InvalidArgumentError as e:
            print(f"kgreedy: error: {path}: not an image this model can read: {_reason(e)}",
                  file=sys.stderr)
            bad += 1
            continue
        probabilities = out["probabilities"].numpy()[0]
        top = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:args.top_k]
        results.append({"file": path, "predictions": [
            {"class_id": i, "class_name": names[i] if names else str(i),
             "probability": float(probabilities[i])} for i in top]})
        if not args.json:
            print(printable(path))
            for p in results[-1]["predictions"]:
                print(f"  {p['probability']:.4f}  {p['class_name']}")
    if args.json:
        print(json.dumps(results, indent=2))
    return cli.EXIT_USAGE if bad else cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

"""Checks an exported SavedModel the way TF Serving uses it, without a TF Serving binary.

    python tools/check_serving.py EXPORT_DIR [--tolerance T] [--seed S]

EXPORT_DIR is a version directory, RUN_DIR/export/MODEL_NAME/VERSION. The tool

1. lists the tag-sets, signatures and input/output specs (as `saved_model_cli show
   --all` does) and checks them against the serving contract (docs/serving.md);
2. checks the layout and the warm-up file `assets.extra/tf_serving_warmup_requests`;
3. makes sample inputs: random raw pixels of the model's input shape (read from the
   signature) and their PNG and JPEG encodings;
4. starts a fresh "server" process in which keras and kgreedy cannot be imported (as in
   a serving image without them), loads the model with the TF1 session loader (tag
   `serve`) as TF Serving's C++ loader does, and answers, feeding and fetching the
   SignatureDef's tensor names without Python-side shape or dtype checks (TF Serving
   makes none): plain tensors, serialized `PredictRequest`s (gRPC), REST bodies in row
   (`instances`) and columnar (`inputs`) format with `{"b64": ...}` for bytes, the
   warm-up records, and malformed requests that must be refused;
5. compares every answer with the model loaded here by `tf.saved_model.load`, and
   `serve_encoded` of PNG/JPEG files with `serving_default` of the same pixels.

It prints one line per check, PASS or FAIL. Exit status: 0 when all pass, 1 when one
fails, 2 when EXPORT_DIR is not a SavedModel (one `kgreedy: error:` line).

The checks are `kgreedy.serving.checks`; this file parses the command line.
"""

import sys

from kgreedy import cli
from kgreedy.serving.checks import check

FLAGS = {"export_dir": "EXPORT_DIR", "tolerance": "--tolerance", "seed": "--seed"}


def main(argv=None):
    """`python tools/check_serving.py EXPORT_DIR [--tolerance T] [--seed S]`."""
    parser = cli.ArgumentParser(
        prog="python tools/check_serving.py",
        description="Check an exported SavedModel version directory the way TF Serving "
                    "loads and answers it (no server needed). Exit 0 when every check "
                    "passes, 1 otherwise.")
    parser.add_argument("export_dir", metavar="EXPORT_DIR",
                        help="version directory, RUN_DIR/export/MODEL_NAME/VERSION")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted difference of probabilities (default 1e-4)")
    parser.add_argument("--seed", type=cli.seed, default=0,
                        help="seed of the sample pixels (0 to 2**32-1)")
    args = parser.parse_args(argv)
    with cli.flags(**FLAGS):
        failed = check(args.export_dir, args.tolerance, args.seed)
    return cli.EXIT_FAILURE if failed else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""Export of the deployed model as a SavedModel in TF Serving's layout (DESIGN.md §6).

`export_saved_model` writes `EXPORT_ROOT/VERSION/` with two signatures under the tag
`serve`:

- `serving_default`: `images` float32 [batch, H, W, C] of raw pixels.
- `serve_encoded`: `image_bytes` string [batch] of PNG or JPEG files (what TF
  Serving's REST API receives as `{"b64": ...}`).

Both return `probabilities` float32 [batch, classes], `class_ids` int64 [batch] and
`class_names` string [batch]. Preprocessing (eval resize/crop through
`data.eval_transform`, normalisation through the model's `standardize` layer) is
inside the graph, so a client sends pixels on the dataset's own scale.

Command line::

    python -m kgreedy.export RUN_DIR [--stage N] [--version V]
"""

import argparse
import os
import re
import shutil
import tempfile

import keras
import tensorflow as tf

from kgreedy import cli, data, rundir
from kgreedy.errors import KgreedyError

_VERSION_RE = re.compile(r"[0-9]+")  # ASCII only: str.isdigit also accepts '²'


# ---------------------------------------------------------------- versions ----

def existing_versions(export_root):
    """Integer version directories below `export_root`, ascending (empty if none)."""
    if not os.path.isdir(export_root):
        return []
    return sorted(int(name) for name in os.listdir(export_root)
                  if _VERSION_RE.fullmatch(name) and int(name) > 0
                  and os.path.isdir(os.path.join(export_root, name)))


def _check_version(version):
    # bool is an int subclass; True is not a version anyone means.
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise KgreedyError("--version", "must be a positive integer", version)


def _exists_error(version, export_root):
    return KgreedyError("--version", f"version {version} already exists in {export_root}; "
                        "exported versions are never overwritten", version)


# -------------------------------------------------------------- signatures ----

def _outputs(logits, class_names):
    """The serving outputs of a batch of logits."""
    logits = tf.cast(logits, tf.float32)  # mixed-precision models give bfloat16/float16
    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int64)
    return {"probabilities": tf.nn.softmax(logits, axis=-1),
            "class_ids": class_ids,
            "class_names": tf.gather(class_names, class_ids)}


def _build_archive(model, spec):
    """An `ExportArchive` holding `model` with both serving signatures."""
    height, width, channels = spec.image_shape
    class_names = tf.constant([str(name) for name in spec.class_names])
    # Without resizing, a batch of another size could only fail deep inside the
    # model, so the signature itself states the size; with resizing any size works.
    if spec.eval_resize == "none":
        images_spec = tf.TensorSpec([None, height, width, channels], tf.float32, name="images")
    else:
        images_spec = tf.TensorSpec([None, None, None, channels], tf.float32, name="images")
    bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")

    def classify(images):
        # images: model-sized, already through eval_transform (never twice: a
        # second resize_crop would crop again).
        return _outputs(model(images, training=False), class_names)

    def decode_one(image_bytes):
        image = data.eval_transform(data.decode_image(image_bytes, channels), spec)
        size = tf.shape(image)[:2]
        ok = tf.reduce_all(tf.equal(size, [height, width]))

        def wrong_size():
            # Only reachable with eval_resize "none": an image of another size is the
            # client's error, not something to resize silently. The failing Assert
            # sits in a cond branch on the data path because grappler drops plain
            # control edges from an Assert to EnsureShape, and EnsureShape would
            # then fail first with a message about internal tensor names.
            message = (f"image_bytes: images must be {height}x{width} pixels (this "
                       f"model does not resize; eval_resize={spec.eval_resize!r}); "
                       "received height, width")
            with tf.control_dependencies([tf.debugging.Assert(ok, [message, size])]):
                return tf.zeros([height, width, channels])

        return tf.cond(ok, lambda: tf.reshape(image, [height, width, channels]),
                       wrong_size)

    # The argument names are the signature input names TF Serving shows.
    def serving_default(images):
        # resize_crop slices with computed offsets, which loses the static shape
        # that the head's flatten/dense need; ensure_shape restores it (and checks it).
        return classify(tf.ensure_shape(data.eval_transform(images, spec),
                                        [None, height, width, channels]))

    def serve_encoded(image_bytes):
        # Images of one request may differ in size, so decode and transform one by
        # one; the fixed output signature lets map_fn stack them into a batch.
        images = tf.map_fn(decode_one, image_bytes, fn_output_signature=tf.TensorSpec(
            [height, width, channels], tf.float32))
        return classify(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    # serving_default first: ExportArchive also aliases its first endpoint to it.
    archive.add_endpoint("serving_default", serving_default, input_signature=[images_spec])
    archive.add_endpoint("serve_encoded", serve_encoded, input_signature=[bytes_spec])
    return archive


# ------------------------------------------------------------------ export ----

def export_saved_model(net, spec, export_root, stage=None, version=None):
    """Exports the deployed model of `net` as version `version` below `export_root`.

    The version directory appears whole or not at all: the SavedModel is written to
    a temporary directory inside `export_root` whose name is not an integer (TF
    Serving ignores it), then renamed. An existing version is never overwritten.

    Args:
        net: a `GreedyNet` with trained weights.
        spec: the `DatasetSpec` the net was trained on (eval resize, class names).
        export_root: TF Serving's model base path; created when missing.
        stage: export blocks 1..stage with head `stage` (default: the last stage).
        version: a positive integer (default: the largest existing version + 1,
            or 1).

    Returns:
        The path of the version directory.

    Raises:
        KgreedyError: `stage` or `version` is out of range, or the version exists.
    """
    if stage is not None and not (isinstance(stage, int) and 1 <= stage <= net.num_stages):
        raise KgreedyError("--stage", f"must be between 1 and {net.num_stages}", stage)
    export_root = os.path.abspath(export_root)
    if version is None:
        version = (existing_versions(export_root) or [0])[-1] + 1
    _check_version(version)
    target = os.path.join(export_root, str(version))
    if os.path.exists(target):
        raise _exists_error(version, export_root)

    archive = _build_archive(net.deployed_model(stage), spec)
    os.makedirs(export_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_root)
    try:
        archive.write_out(tmp, verbose=False)
        # Another export may have taken the version meanwhile. rename() would
        # replace an empty directory, so check again just before it; a non-empty
        # one makes rename() fail instead of overwriting.
        if os.path.exists(target):
            raise _exists_error(version, export_root)
        try:
            os.rename(tmp, target)
        except OSError:
            if os.path.exists(target):
                raise _exists_error(version, export_root) from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------- command ----

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; received {text!r}")
    return value


def main(argv=None):
    """`python -m kgreedy.export RUN_DIR [--stage N] [--version V]`."""
    parser = cli.ArgumentParser(
        prog="python -m kgreedy.export",
        description="Export a trained run as a SavedModel for TF Serving into "
                    "RUN_DIR/export/MODEL_NAME/VERSION/ and print that path.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory of kgreedy.train")
    parser.add_argument("--stage", type=int, default=None,
                        help="export blocks 1..N with head N (default: last trained stage)")
    parser.add_argument("--version", type=_positive_int, default=None,
                        help="version directory (default: largest existing + 1)")
    args = parser.parse_args(argv)
    recipe, spec, net, stage = rundir.load_trained(args.run_dir, args.stage)
    export_root = rundir.RunDir(args.run_dir).export_root(recipe.model_name)
    print(export_saved_model(net, spec, export_root, stage, args.version))
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(cli.run(main))

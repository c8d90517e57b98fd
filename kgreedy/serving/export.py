"""Export of the deployed model as a SavedModel in TF Serving's layout (docs/DESIGN.md,
"Serving signatures").

`export_saved_model` writes `EXPORT_ROOT/VERSION/` with two signatures under the tag
`serve`:

- `serving_default`: `images` float32 [batch, H, W, C] of raw pixels.
- `serve_encoded`: `image_bytes` string [batch] of PNG or JPEG files (what TF
  Serving's REST API receives as `{"b64": ...}`).

Both return `probabilities` float32 [batch, classes], `class_ids` int64 [batch] and
`class_names` string [batch]. Preprocessing (eval resize/crop through
`data.eval_transform`, normalisation through the model's `standardize` layer) is
inside the graph, so a client sends pixels on the dataset's own scale. Inputs of the
wrong rank or channel count fail inside the graph with an error naming the input:
TF Serving feeds tensors to the session without checking them against the
signature's shapes.

`serve_encoded` reads each file's header before decoding it and refuses, with an
InvalidArgumentError naming the size and the limit, an image that declares more
than `max_pixels` pixels (the recipe's `data.max_pixels`, a constant of the graph)
or bytes that are not a JPEG, PNG, GIF, BMP or WebP file
(`kgreedy.data.images.declared_size`).

Every version directory also holds `assets.extra/tf_serving_warmup_requests`, the
warm-up requests TF Serving replays at load time (`kgreedy.serving.warmup_file`), and
the object graph keeps the class names as `class_names` and the pixel limit as
`max_pixels` (one-variable collections) for `kgreedy.predict`. Versions are listed
and pruned by `kgreedy.serving.versions`.

"""

import os
import shutil
import tempfile
import warnings

import keras
import tensorflow as tf

from kgreedy import data
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import umask_mode, write_json
from kgreedy.config.recipe import DataConfig
from kgreedy.config.vocabulary import EXPORT_HEADS
from kgreedy.serving import versions, warmup_file
from kgreedy.serving.signatures import EXIT_PLAN_FILE
from kgreedy.serving.early_exit import (check_thresholds, describe_plan,
                                        early_exit_logits, plan_exits)
from kgreedy.training.actions import Action
from kgreedy.training.preemption import Interrupted

DEFAULT_MAX_PIXELS = DataConfig().max_pixels  # the recipe's data.max_pixels default


# ---------------------------------------------------------------- versions ----

def _check_version(version):
    # bool is an int subclass; True is not a version anyone means.
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise KgreedyError("version", "must be a positive integer", version)


def _exists_error(version, export_root):
    return KgreedyError("version", f"version {version} already exists in {export_root}; "
                        "exported versions are never overwritten", version)


# -------------------------------------------------------------- signatures ----

def _outputs(logits, class_names):
    """The serving outputs of a batch of logits."""
    logits = tf.cast(logits, tf.float32)  # mixed-precision models give bfloat16/float16
    class_ids = tf.argmax(logits, axis=-1, output_type=tf.int64)
    return {"probabilities": tf.nn.softmax(logits, axis=-1),
            "class_ids": class_ids,
            "class_names": tf.gather(class_names, class_ids)}


def _build_archive(model, spec, max_pixels=DEFAULT_MAX_PIXELS, exits=None):
    """An `ExportArchive` holding `model` with both serving signatures; `serve_encoded`
    refuses images whose header declares more than `max_pixels` pixels.

    With `exits` = (net, stage, thresholds), the signatures run modules 1..stage
    with early exits (`kgreedy.serving.early_exit`) at the thresholds, and add
    `exit_stage`; `serving_thresholds` and `serve_encoded_thresholds` take the
    thresholds as a second input (TF Serving refuses a request that leaves out a
    signature's input, so the default thresholds need signatures of their own)."""
    height, width, channels = spec.image_shape
    class_names = tf.constant([str(name) for name in spec.class_names])
    # Without resizing, a batch of another size could only fail deep inside the
    # model, so the signature itself states the size; with resizing any size works.
    if spec.eval_resize == "none":
        images_spec = tf.TensorSpec([None, height, width, channels], tf.float32, name="images")
    else:
        images_spec = tf.TensorSpec([None, None, None, channels], tf.float32, name="images")
    bytes_spec = tf.TensorSpec([None], tf.string, name="image_bytes")

    num_classes = len(spec.class_names)
    if exits:
        net, stage, thresholds = exits
        thresholds_spec = tf.TensorSpec([stage], tf.float32, name="thresholds")
        default_thresholds = tf.Variable(thresholds, dtype=tf.float32, trainable=False,
                                         name="early_exit_thresholds")

    def predict(images, thresholds=None):
        if not exits:
            return _outputs(model(images, training=False), class_names)
        logits, exit_stage = early_exit_logits(
            net, images, default_thresholds if thresholds is None else thresholds, stage)
        return {**_outputs(logits, class_names), "exit_stage": exit_stage}

    def classify(images, thresholds=None):
        # images: model-sized, already through eval_transform (never twice: a
        # second resize_crop would crop again). An empty batch is a valid request,
        # but TensorFlow 2.21's CPU conv2d returns an empty tensor with the input's
        # channel count for it (tf.nn.conv2d of [0,8,8,1] gives [0,8,8,1]) and the
        # next layer fails; so it is answered without running the model.
        def empty():
            return {"probabilities": tf.zeros([0, num_classes]),
                    "class_ids": tf.zeros([0], tf.int64),
                    "class_names": tf.zeros([0], tf.string),
                    **({"exit_stage": tf.zeros([0], tf.int64)} if exits else {})}

        return tf.cond(tf.shape(images)[0] > 0, lambda: predict(images, thresholds), empty)

    def decode_one(image_bytes):
        image = data.eval_transform(data.decode_image(image_bytes, channels, max_pixels),
                                    spec)
        size = tf.shape(image)[:2]
        ok = tf.reduce_all(tf.equal(size, [height, width]))

        def wrong_size():
            # Only reachable with eval_resize "none": an image of another size is the
            # client's error, not something to resize silently. The failing Assert
            # sits in a cond branch on the data path because grappler drops plain
            # control edges from an Assert to EnsureShape, and EnsureShape would
            # then fail first with a message about internal tensor names.
            message = (f"image_bytes: images must be {height}x{width} pixels (this "
                       f"model does not resize: eval_resize is {spec.eval_resize}); "
                       "received height, width")
            with tf.control_dependencies([tf.debugging.Assert(ok, [message, size])]):
                return tf.zeros([height, width, channels])

        return tf.cond(ok, lambda: tf.reshape(image, [height, width, channels]),
                       wrong_size)

    def within_pixel_limit(images):
        # The same limit as serve_encoded's: resizing a request of huge images would
        # cost many times its own size. The Assert sits in a cond branch on the data
        # path, for the reason wrong_size's does.
        size = tf.shape(images, out_type=tf.int64)[1:3]
        pixels = size[0] * size[1]
        ok = pixels <= max_pixels

        def refuse():
            message = [f"images: each image's height x width may be at most "
                       f"{max_pixels} pixels (data.max_pixels); received",
                       size[0], "x", size[1], "=", pixels]
            with tf.control_dependencies([tf.debugging.Assert(ok, message)]):
                return tf.identity(images)

        return tf.cond(ok, lambda: images, refuse)

    def checked(thresholds):
        # Fed by the client: [stage] float32 in [0, 1], else an error naming it.
        thresholds = tf.ensure_shape(thresholds, thresholds_spec.shape)
        ok = tf.reduce_all(tf.logical_and(thresholds >= 0.0, thresholds <= 1.0))
        message = "thresholds: each must be between 0 and 1; received"
        with tf.control_dependencies([tf.debugging.Assert(ok, [message, thresholds])]):
            return tf.identity(thresholds)

    # The argument names are the signature input names TF Serving shows.
    def serving_default(images, thresholds=None):
        # The signature's TensorSpec is not enforced on requests (TF Serving and the
        # loaded signature functions feed any shape), so check it first, while the
        # error can still name the input: "Shape of tensor images [1,8,8,3] is not
        # compatible with expected shape [?,8,8,1]". Later ops would fail with
        # internal names, or resize silently.
        images = tf.ensure_shape(images, images_spec.shape)
        if spec.eval_resize != "none":  # any size is taken, so the pixel limit holds
            images = within_pixel_limit(images)
        # resize_crop slices with computed offsets, which loses the static shape
        # that the head's flatten/dense need; ensure_shape restores it.
        return classify(tf.ensure_shape(data.eval_transform(images, spec),
                                        [None, height, width, channels]), thresholds)

    def serve_encoded(image_bytes, thresholds=None):
        # A scalar string would otherwise fail in map_fn as "slice index 0 out of
        # bounds".
        image_bytes = tf.ensure_shape(image_bytes, bytes_spec.shape)
        # Images of one request may differ in size, so decode and transform one by
        # one; the fixed output signature lets map_fn stack them into a batch.
        images = tf.map_fn(decode_one, image_bytes, fn_output_signature=tf.TensorSpec(
            [height, width, channels], tf.float32))
        return classify(images, thresholds)

    archive = keras.export.ExportArchive()
    archive.track(model)
    # serving_default first: ExportArchive also aliases its first endpoint to it.
    archive.add_endpoint("serving_default", serving_default, input_signature=[images_spec])
    archive.add_endpoint("serve_encoded", serve_encoded, input_signature=[bytes_spec])
    if exits:
        archive.add_variable_collection("early_exit_thresholds", [default_thresholds])

        def serving_thresholds(images, thresholds):
            return serving_default(images, checked(thresholds))

        def serve_encoded_thresholds(image_bytes, thresholds):
            return serve_encoded(image_bytes, checked(thresholds))

        archive.add_endpoint("serving_thresholds", serving_thresholds,
                             input_signature=[images_spec, thresholds_spec])
        archive.add_endpoint("serve_encoded_thresholds", serve_encoded_thresholds,
                             input_signature=[bytes_spec, thresholds_spec])
    # The signatures return the top class's name only; top-k listings need them all.
    archive.add_variable_collection("class_names", [tf.Variable(
        class_names, trainable=False, name="class_names")])
    archive.add_variable_collection("max_pixels", [tf.Variable(
        max_pixels, dtype=tf.int64, trainable=False, name="max_pixels")])
    return archive


# ------------------------------------------------------------------ export ----

def export_saved_model(net, spec, export_root, stage=None, version=None,
                       keep_versions=None, heads="last", max_pixels=DEFAULT_MAX_PIXELS,
                       thresholds=None, exit_plan=None):
    """Exports the deployed model of `net` as version `version` below `export_root`.

    The version directory appears whole or not at all: the SavedModel and its
    warm-up requests are written to a temporary directory inside `export_root`
    whose name is not an integer (TF Serving ignores it), then renamed. An existing
    version is never overwritten. The model name in the warm-up requests is the
    name of `export_root` (RUN_DIR/export/MODEL_NAME).

    Args:
        net: a `GreedyNet` with trained weights.
        spec: the `DatasetSpec` the net was trained on (eval resize, class names).
        export_root: TF Serving's model base path; created when missing.
        stage: export modules 1..stage with head `stage` (default: the last stage).
        version: a positive integer (default: the largest existing version + 1,
            or 1).
        keep_versions: after a successful export, delete all but the newest N
            versions (never the one just written); None keeps all. A failure to
            delete is a warning: the new version is in place.
        heads: `last` serves head `stage`; `ensemble` serves the weighted ensemble
            of heads 1..stage (`GreedyNet.deployed_model`), same signatures;
            `early_exit` runs modules 1..stage with early exits at `thresholds`
            (`kgreedy.serving.early_exit`), the signatures adding `exit_stage`.
        thresholds: with `early_exit`, one per head 1..stage, each in [0, 1] (the
            last one's is not used: the last head answers what is left); default:
            `exit_plan`'s.
        exit_plan: with `early_exit`, `kgreedy.serving.early_exit.plan_exits`'s
            result, written to the version's assets.extra/early_exit.json.
        max_pixels: `serve_encoded` refuses an image whose header declares more
            pixels (width x height) than this (the recipe's `data.max_pixels`).

    Returns:
        The path of the version directory.

    Raises:
        KgreedyError: `stage`, `version` or `keep_versions` is out of range, or the
            version exists.
    """
    if stage is not None and not (isinstance(stage, int) and 1 <= stage <= net.num_stages):
        raise KgreedyError("stage", f"must be between 1 and {net.num_stages}", stage)
    versions.check_keep_versions(keep_versions)
    if heads not in EXPORT_HEADS:
        raise KgreedyError("heads", "must be one of " + ", ".join(map(repr, EXPORT_HEADS)),
                           heads)
    export_root = os.path.abspath(export_root)
    if version is None:
        version = (versions.existing_versions(export_root) or [0])[-1] + 1
    _check_version(version)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise KgreedyError("max_pixels", "must be a positive integer", max_pixels)
    target = os.path.join(export_root, str(version))
    if os.path.exists(target):
        raise _exists_error(version, export_root)

    exits = None
    if heads == "early_exit" and thresholds is None and exit_plan is not None:
        thresholds = exit_plan["thresholds"]
    if heads == "early_exit":
        stage = stage or net.num_stages
        exits = (net, stage, check_thresholds(thresholds, stage))
    elif thresholds is not None or exit_plan is not None:
        raise KgreedyError("thresholds", f"only apply to heads 'early_exit', not {heads!r}",
                           thresholds if thresholds is not None else exit_plan["thresholds"])
    # The ensemble model holds every module and head 1..stage: what early exits run.
    model = net.deployed_model(stage, "ensemble" if exits else heads)
    archive = _build_archive(model, spec, max_pixels, exits)
    os.makedirs(export_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_root)
    try:
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp's 0700 would hide it from TF Serving
        archive.write_out(tmp, verbose=False)
        warmup_file.write_warmup_requests(tmp, os.path.basename(export_root),
                                          spec.image_shape)
        if exit_plan is not None:
            write_json(os.path.join(tmp, EXIT_PLAN_FILE), exit_plan)
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
    if keep_versions is not None:
        try:
            versions.prune_versions(export_root, keep_versions, protect=[version])
        except OSError as e:
            warnings.warn(f"exported {target}, but deleting old versions failed: {e}",
                          stacklevel=2)
    return target


class Exporter(Action):
    """The export as a run's last action (`kgreedy.training.actions`): once every
    stage is done and scored (`on_finish`), it exports the last stage's modules with
    `heads` and sets summary.json's `final["export_path"]` and `export_heads`.

    A SIGTERM while it exports stops the run with nothing half-written: the
    temporary version is removed (`export_saved_model` does it, and this action
    does it for one made between its creation and that function's `try`). Once the
    version is in place it is too late to stop.

    Args:
        spec: the `DatasetSpec` the net trains on.
        export_root: TF Serving's model base path (RUN_DIR/export/MODEL_NAME).
        version: see `export_saved_model`.
        keep_versions: see `export_saved_model`.
        heads: see `export_saved_model`.
        max_pixels: see `export_saved_model` (the recipe's `data.max_pixels`).
    """

    def __init__(self, spec, export_root, version=None, keep_versions=None, heads="last",
                 max_pixels=DEFAULT_MAX_PIXELS, max_accuracy_drop=0.5):
        self.spec = spec
        self.export_root = export_root
        self.version = version
        self.keep_versions = keep_versions
        self.heads = heads
        self.max_pixels = max_pixels
        self.max_accuracy_drop = max_accuracy_drop

    def __call__(self, net, stage, exit_plan=None):
        """Exports modules 1..`stage` of `net`; returns the version's path."""
        return export_saved_model(net, self.spec, self.export_root, stage=stage,
                                  version=self.version, keep_versions=self.keep_versions,
                                  heads=self.heads, max_pixels=self.max_pixels,
                                  exit_plan=exit_plan)

    def on_finish(self, trainer, final):
        trainer.preemption.finishing = "while exporting"
        before = versions.temporary_versions(self.export_root)
        plan = None
        if self.heads == "early_exit":
            trainer.progress.message("calibrating the early exits on the evaluation split")
            plan = plan_exits(trainer.net, trainer.datasets.eval, final["stage"],
                              self.max_accuracy_drop)
        try:
            final["export_path"] = self(trainer.net, final["stage"], plan)
        except Interrupted:
            for path in versions.temporary_versions(self.export_root) - before:
                shutil.rmtree(path, ignore_errors=True)
            raise
        trainer.preemption.finishing = ""  # too late to stop: the version is whole
        final["export_heads"] = self.heads
        if plan is not None:
            final["early_exit"] = plan
            trainer.progress.message(describe_plan(plan))
        trainer.progress.message(f"exported {final['export_path']}")

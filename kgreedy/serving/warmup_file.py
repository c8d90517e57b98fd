"""The warm-up file `assets.extra/tf_serving_warmup_requests`: kgreedy writes it into
every export, and checks it as TF Serving reads it.

TF Serving replays this file's requests when it loads a version, before the version
takes traffic, so that the first real requests do not pay for graph optimisation and
memory allocation. It refuses to load a version whose file is not a TFRecord of
`PredictionLog`s, or has more than 1000 records, and a record naming an unknown
signature or the wrong inputs fails the load too. `write_warmup_requests` writes one
record per signature (`kgreedy.serving.export` calls it); the checks read the file
here without a server, and `kgreedy.serving.tf_server` replays the records in the
server process. The records also tell the sample size of a model whose signature
leaves the image size open.

TensorFlow is imported where it is needed: the checks read the export directory
before it loads (`signatures.read_saved_model`).
"""

import os

from kgreedy.serving.signatures import SIGNATURES
from kgreedy.serving.tf_server import dtype_name

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving refuses to load a model with more


def warmup_path(export_dir):
    """The warm-up file's path in the version directory `export_dir`."""
    return os.path.join(export_dir, WARMUP_FILE)


# ----------------------------------------------------------------- writing ----

def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _field(number, payload):
    """One length-delimited protobuf field (wire type 2)."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _prediction_log(model_name, signature_name, inputs):
    """A serialized `tensorflow.serving.PredictionLog` holding one PredictRequest.

    tensorflow-serving-api is a test dependency only, and exporting must not need
    it, so the few fields are encoded by hand; the wire format is protobuf's stable
    one, and the tests parse these bytes with the real protos. Field numbers:
    PredictionLog.predict_log = 6, PredictLog.request = 1, PredictRequest.model_spec
    = 1 and .inputs = 2 (a map: entries with key = 1, value = 2), ModelSpec.name = 1
    and .signature_name = 3.

    Args:
        model_name: the request's `model_spec.name`.
        signature_name: the request's `model_spec.signature_name`.
        inputs: {input name: serialized `TensorProto`}.
    """
    model_spec = _field(1, model_name) + _field(3, signature_name)
    request = _field(1, model_spec) + b"".join(
        _field(2, _field(1, name) + _field(2, tensor)) for name, tensor in inputs.items())
    return _field(6, _field(1, request))


def write_warmup_requests(version_dir, model_name, image_shape):
    """Writes `assets.extra/tf_serving_warmup_requests` into `version_dir`.

    TF Serving replays these requests when it loads the version, before it is
    marked available, so the first client does not pay for graph optimisation and
    kernel set-up; a request that fails makes the load fail. One record per
    signature: a batch of one all-zero image, as pixels for `serving_default` and as
    a PNG for `serve_encoded`, both of the model's input size (which every export
    accepts, resizing or not).

    Args:
        version_dir: the (temporary) version directory.
        model_name: recorded as the requests' `model_spec.name`.
        image_shape: (height, width, channels) of the model input.
    """
    import tensorflow as tf

    def tensor(value):
        return tf.make_tensor_proto(value).SerializeToString()

    zeros = tf.zeros([1, *image_shape], tf.float32)
    png = tf.io.encode_png(tf.zeros(image_shape, tf.uint8))
    path = warmup_path(version_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(_prediction_log(model_name, "serving_default",
                                     {"images": tensor(zeros)}))
        writer.write(_prediction_log(model_name, "serve_encoded",
                                     {"image_bytes": tensor(tf.reshape(png, [1]))}))


# ----------------------------------------------------------------- reading ----

def _records(path):
    """The file's records as PredictionLogs (raises on a malformed file)."""
    from tensorflow_serving.apis import prediction_log_pb2
    import tensorflow as tf

    return [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(path)]


def _record_problems(records, specs):
    """(problems, signatures covered) of the records against the signatures' inputs."""
    problems, covered = [], set()
    if not 0 < len(records) <= MAX_WARMUP_RECORDS:
        problems.append(f"{len(records)} records; TF Serving reads 1 to "
                        f"{MAX_WARMUP_RECORDS}")
    for i, log in enumerate(records):
        if log.WhichOneof("log_type") != "predict_log":
            problems.append(f"record {i} is a {log.WhichOneof('log_type')}, not a predict_log")
            continue
        request = log.predict_log.request
        signature = request.model_spec.signature_name or "serving_default"
        covered.add(signature)
        if signature not in specs:
            problems.append(f"record {i} names the unknown signature {signature!r}")
            continue
        inputs = specs[signature]["inputs"]
        have = {k: dtype_name(v.dtype) for k, v in request.inputs.items()}
        if have != {k: v["dtype"] for k, v in inputs.items()}:
            problems.append(f"record {i} ({signature}) has inputs {have}, the signature "
                            f"{ {k: v['dtype'] for k, v in inputs.items()} }")
    return problems, covered


def check_warmup_file(export_dir, specs):
    """Checks the warm-up file of `export_dir` against the signatures.

    Args:
        export_dir: the version directory.
        specs: `signatures.signature_specs` of its `serve` MetaGraphDef.

    Returns:
        (ok, detail, records): whether TF Serving would accept the file, what is wrong
        with it or what it holds, and its PredictionLog records ([] when unreadable).
    """
    import tensorflow as tf

    path = warmup_path(export_dir)
    if not os.path.isfile(path):
        return False, f"{WARMUP_FILE} is missing", []
    try:
        records = _records(path)
    except (tf.errors.OpError, ValueError) as e:  # DecodeError is a ValueError
        return False, f"{WARMUP_FILE} is not a TFRecord of PredictionLogs: {e}", []
    problems, covered = _record_problems(records, specs)
    missing = [s for s in SIGNATURES if s not in covered]
    if missing:
        problems.append(f"no record for {missing}")
    return (not problems, "; ".join(problems) or
            f"{len(records)} PredictionLog records for {sorted(covered)}", records)


def model_size(signature_shape, records):
    """(height, width) of sample images: the signature's, else the warm-up request's.

    A model that resizes declares (-1, -1, -1, C); its warm-up request still has the
    size it was trained at, the size at which its answers are most meaningful.
    """
    import tensorflow as tf

    if signature_shape[1] > 0 and signature_shape[2] > 0:
        return signature_shape[1], signature_shape[2]
    for log in records:
        request = log.predict_log.request
        if (request.model_spec.signature_name == "serving_default"
                and "images" in request.inputs):
            shape = tf.make_ndarray(request.inputs["images"]).shape
            if len(shape) == 4:
                return shape[1], shape[2]
    return 32, 32

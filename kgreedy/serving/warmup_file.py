"""The warm-up file `assets.extra/tf_serving_warmup_requests`, as TF Serving reads it.

TF Serving replays this file's requests when it loads a version, before the version
takes traffic, so that the first real requests do not pay for graph optimisation and
memory allocation. It refuses to load a version whose file is not a TFRecord of
`PredictionLog`s, or has more than 1000 records, and a record naming an unknown
signature or the wrong inputs fails the load too. These checks read the file here
without a server; `kgreedy.serving.tf_server` replays the records in the server
process. The records also tell the sample size of a model whose signature leaves the
image size open.
"""

import os

from kgreedy.serving.signatures import SIGNATURES
from kgreedy.serving.tf_server import dtype_name

MAX_WARMUP_RECORDS = 1000  # TF Serving refuses to load a model with more


def _warmup_file():
    # Imported when needed: kgreedy.serving.export imports TensorFlow, which must wait
    # until the export directory has been checked (signatures.read_saved_model).
    from kgreedy.serving.export import WARMUP_FILE

    return WARMUP_FILE


def warmup_path(export_dir):
    """The warm-up file's path in the version directory `export_dir`."""
    return os.path.join(export_dir, _warmup_file())


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

    warmup_file = _warmup_file()
    path = warmup_path(export_dir)
    if not os.path.isfile(path):
        return False, f"{warmup_file} is missing", []
    try:
        records = _records(path)
    except (tf.errors.OpError, ValueError) as e:  # DecodeError is a ValueError
        return False, f"{warmup_file} is not a TFRecord of PredictionLogs: {e}", []
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

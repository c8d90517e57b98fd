"""A stand-in for TF Serving's model server, run in a fresh process.

TF Serving loads a SavedModel from C++ with the TF1 session loader (tag `serve`), in a
process that has neither keras nor kgreedy, and feeds the SignatureDef's tensor names
to the session without checking shapes or dtypes against the signature. An export that
needs Keras at load time, or that relies on Python-side input checks to refuse bad
requests, passes `tf.saved_model.load` in a training process and still fails in
production. This module recreates the production setting so that `kgreedy.serving.checks`
can see such failures without a TF Serving binary:

- `run_server` (in the checking process) starts this file as a script in a fresh
  interpreter and hands it requests, and gets its answers, as JSON files;
- `serve` (in that fresh process) makes keras, tf_keras and kgreedy unimportable before
  TensorFlow is imported, loads the model, and answers plain tensor feeds, serialized
  `PredictRequest`s (gRPC), REST bodies in row (`instances`) and columnar (`inputs`)
  format, and the warm-up records, as TF Serving would. It also reports which blocked
  modules got imported anyway.

The REST conversions follow TF Serving's json_tensor.cc, so that a body this server
accepts or refuses is one TF Serving accepts or refuses.

Nothing here imports kgreedy, nor TensorFlow at module level: the fresh process runs
this file by path and must install its import blocker before anything else.
"""

import base64
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_BLOCKED = ("keras", "tf_keras", "kgreedy")
_NUMPY_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32,
                 "DT_INT64": np.int64, "DT_UINT8": np.uint8, "DT_BOOL": np.bool_,
                 "DT_STRING": object}


class ServingError(Exception):
    """A request that TF Serving answers with an error (HTTP 400, INVALID_ARGUMENT)."""


def dtype_name(enum_value):
    """The name of a `DataType` enum value, e.g. `DT_FLOAT`, as SignatureDefs spell it."""
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum_value)


# ------------------------------------------------------ arrays across processes ----

def pack(array):
    """A numpy array as JSON (the two processes exchange requests and answers as JSON)."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        return {"dtype": "string", "shape": list(array.shape),
                "items": [base64.b64encode(bytes(b)).decode() for b in array.reshape(-1)]}
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()}


def unpack(packed):
    """The numpy array that `pack` made `packed` from."""
    if packed["dtype"] == "string":
        items = np.empty(len(packed["items"]), object)
        items[:] = [base64.b64decode(item) for item in packed["items"]]
        return items.reshape(packed["shape"])
    return np.frombuffer(base64.b64decode(packed["data"]),
                         packed["dtype"]).reshape(packed["shape"]).copy()


# ---------------------------------------------------- REST, as TF Serving does it ----

def _is_b64(value):
    return isinstance(value, dict) and list(value) == ["b64"] and isinstance(value["b64"], str)


def _json_to_array(value, dtype, where):
    """A JSON value (nested lists) as an array of the signature's dtype.

    Follows TF Serving's json_tensor.cc: numbers for numeric tensors (integers only for
    integer ones), strings or `{"b64": ...}` for string tensors, and every list at one
    depth of the same length.
    """
    if dtype not in _NUMPY_DTYPES:
        raise ServingError(f"{where}: tensors of type {dtype} are not supported here")

    def shape_of(v):
        if isinstance(v, list):
            shapes = [shape_of(item) for item in v]
            if any(s != shapes[0] for s in shapes):
                raise ServingError(f"{where}: lists of different lengths at one depth "
                                   "(all instances must have the same shape)")
            return [len(v)] + (shapes[0] if shapes else [])
        return []

    shape = shape_of(value)
    flat = list(_json_leaves(value, dtype, where))
    if dtype == "DT_STRING":
        array = np.empty(len(flat), object)
        array[:] = flat
    else:
        array = np.array(flat, _NUMPY_DTYPES[dtype])
    return array.reshape(shape)


def _json_leaves(value, dtype, where):
    """The scalars of a nested JSON list, checked against `dtype` as TF Serving does."""
    if isinstance(value, list):
        for item in value:
            yield from _json_leaves(item, dtype, where)
        return
    if dtype == "DT_STRING":
        if _is_b64(value):
            try:
                yield base64.b64decode(value["b64"], validate=True)
            except ValueError:
                raise ServingError(f"{where}: JSON value {value!r} is not valid base64") \
                    from None
        elif isinstance(value, str):
            yield value.encode("utf-8")
        else:
            raise ServingError(f"{where}: JSON value {value!r} is not of expected type: "
                               "string")
    # bool is an int subclass, and JSON's 1.0 is a float: neither may pass for the other.
    elif isinstance(value, bool) != (dtype == "DT_BOOL") or not isinstance(
            value, (int, float)) or (dtype not in ("DT_FLOAT", "DT_DOUBLE")
                                     and isinstance(value, float)):
        raise ServingError(f"{where}: JSON value {value!r} is not of expected type: "
                           f"{dtype}")
    else:
        yield value


def _rest_values(body, names):
    """{input name: JSON value} of a REST predict body, for the signature's inputs."""
    if ("instances" in body) == ("inputs" in body):
        raise ServingError("the body needs exactly one of 'instances' (row format) or "
                           "'inputs' (columnar format)")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise ServingError("'instances' must be a non-empty list")
        if isinstance(instances[0], dict) and not _is_b64(instances[0]):
            # Named instances: one object per example, keyed by input name.
            for i, instance in enumerate(instances):
                if not isinstance(instance, dict) or _is_b64(instance) \
                        or set(instance) != set(names):
                    raise ServingError(f"instances[{i}]: expected an object with the keys "
                                       f"{sorted(names)}; received {instance!r:.80}")
            return {name: [instance[name] for instance in instances] for name in names}
        if len(names) != 1:
            raise ServingError("instances is a plain list, but the signature has several "
                               f"inputs {sorted(names)}: send a list of objects")
        return {next(iter(names)): instances}
    columns = body["inputs"]
    if isinstance(columns, dict) and not _is_b64(columns):
        if set(columns) != set(names):
            raise ServingError(f"'inputs' has the keys {sorted(columns)}; the signature "
                               f"has the inputs {sorted(names)}")
        return columns
    if len(names) != 1:
        raise ServingError("'inputs' is not an object, but the signature has several "
                           f"inputs {sorted(names)}")
    return {next(iter(names)): columns}


def _rest_inputs(body, signature):
    """The input tensors of a REST predict body, for the SignatureDef `signature`."""
    specs = {name: info["dtype"] for name, info in signature["inputs"].items()}
    values = _rest_values(body, specs)
    return {name: _json_to_array(values[name], specs[name], name) for name in specs}


def _to_json(value, name):
    """An output array as JSON: bytes as text, or as `{"b64": ...}` when the output's name
    ends in `_bytes` (TF Serving's rule)."""
    if isinstance(value, np.ndarray):
        return [_to_json(item, name) for item in value]
    if isinstance(value, bytes):
        if name.endswith("_bytes"):
            return {"b64": base64.b64encode(value).decode()}
        return value.decode("utf-8", errors="replace")
    return value.item() if isinstance(value, np.generic) else value


def _rest_outputs(outputs, row):
    """TF Serving's REST response body for `outputs` (name -> array)."""
    if not row:
        if len(outputs) == 1:
            return {"outputs": _to_json(next(iter(outputs.values())), next(iter(outputs)))}
        return {"outputs": {name: _to_json(v, name) for name, v in outputs.items()}}
    sizes = {name: (v.shape[0] if v.ndim else None) for name, v in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ServingError(f"row format needs outputs of one batch size; received {sizes}")
    batch = next(iter(sizes.values()))
    if len(outputs) == 1:
        name, value = next(iter(outputs.items()))
        return {"predictions": [_to_json(value[i], name) for i in range(batch)]}
    return {"predictions": [{name: _to_json(v[i], name) for name, v in outputs.items()}
                            for i in range(batch)]}


# ------------------------------------------------------------ the server process ----

def _block_imports():
    """Makes keras, tf_keras and kgreedy unimportable in this process."""
    import importlib.abc
    import importlib.machinery

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"{spec.name} is blocked in the serving check process")

        def exec_module(self, module):
            pass

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, Block())


class _Server:
    """TF Serving's Predict API over a TF1 session: SignatureDef tensor names, raw feeds."""

    def __init__(self, model_dir):
        import tensorflow as tf

        self.tf = tf
        tf.compat.v1.disable_eager_execution()  # TF Serving runs graphs in a session
        self.session = tf.compat.v1.Session(graph=tf.Graph())
        with self.session.graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"],
                                                              model_dir)
        self.signatures = meta_graph.signature_def
        name = os.path.basename(os.path.normpath(model_dir))
        self.version = int(name) if name.isascii() and name.isdigit() else None

    def run(self, signature_name, inputs, output_filter=()):
        """Runs a signature on `inputs` (name -> array) by the SignatureDef's tensor names."""
        if signature_name not in self.signatures:
            raise ServingError(f"Serving signature name: {signature_name!r} not found in "
                               f"signature def; available: {sorted(self.signatures)}")
        signature = self.signatures[signature_name]
        if set(inputs) != set(signature.inputs):
            raise ServingError(f"input names {sorted(inputs)} do not match the signature's "
                               f"inputs {sorted(signature.inputs)}")
        unknown = set(output_filter) - set(signature.outputs)
        if unknown:
            raise ServingError(f"output tensor alias not found in signature: {sorted(unknown)}")
        names = list(output_filter) or sorted(signature.outputs)
        graph = self.session.graph
        feeds = {graph.get_tensor_by_name(signature.inputs[k].name)._as_tf_output(): v
                 for k, v in inputs.items()}
        fetches = [graph.get_tensor_by_name(signature.outputs[k].name)._as_tf_output()
                   for k in names]
        # The C API run, as TF Serving's Session::Run: Session.run() would check the
        # feeds against the placeholders' static shapes and cast their dtypes first,
        # and so hide what the graph itself lets through.
        values = self.session._call_tf_sessionrun(None, feeds, fetches, [], None)
        return dict(zip(names, values))

    def predict(self, request_bytes):
        """A serialized PredictRequest in, a serialized PredictResponse out (gRPC)."""
        from tensorflow_serving.apis import predict_pb2

        tf = self.tf
        request = predict_pb2.PredictRequest.FromString(request_bytes)
        name = request.model_spec.signature_name or "serving_default"
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        outputs = self.run(name, inputs, list(request.output_filter))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        response.model_spec.signature_name = name
        if self.version is not None:
            response.model_spec.version.value = self.version
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response.SerializeToString()

    def rest(self, body_text):
        """A REST predict body in, (HTTP status, response body) out."""
        try:
            body = json.loads(body_text)
            if not isinstance(body, dict):
                raise ServingError("the body must be a JSON object")
            name = body.get("signature_name", "serving_default")
            if name not in self.signatures:
                raise ServingError(f"Serving signature name: {name!r} not found")
            signature = self.signatures[name]
            spec = {"inputs": {k: {"dtype": dtype_name(v.dtype)}
                               for k, v in signature.inputs.items()}}
            outputs = self.run(name, _rest_inputs(body, spec))
            return 200, json.dumps(_rest_outputs(outputs, row="instances" in body))
        except (ServingError, ValueError, self.tf.errors.OpError) as e:
            message = e.message if isinstance(e, self.tf.errors.OpError) else str(e)
            return 400, json.dumps({"error": message})

    def warmup(self, path):
        """Replays the warm-up records of the file `path` as TF Serving does at load time."""
        from tensorflow_serving.apis import prediction_log_pb2

        results = []
        for record in self.tf.compat.v1.io.tf_record_iterator(path):
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                results.append({"error": f"not a predict_log: {log.WhichOneof('log_type')}"})
                continue
            request = log.predict_log.request
            try:
                self.predict(request.SerializeToString())
                results.append({"signature": request.model_spec.signature_name})
            except (ServingError, self.tf.errors.OpError) as e:
                results.append({"signature": request.model_spec.signature_name,
                                "error": str(e)})
        return results

    def answer(self, request):
        """The JSON answer to one request of `run_server`'s list."""
        kind = request["kind"]
        if kind == "tensors":
            outputs = self.run(request["signature"],
                               {k: unpack(v) for k, v in request["inputs"].items()})
            return {"outputs": {k: pack(v) for k, v in outputs.items()}}
        if kind == "grpc":
            response = self.predict(base64.b64decode(request["request"]))
            return {"response": base64.b64encode(response).decode()}
        if kind == "rest":
            status, body = self.rest(request["body"])
            return {"status": status, "body": body}
        return {"records": self.warmup(request["path"])}


def serve(model_dir, requests_path, answers_path):
    """The server process: answers every request of `requests_path` into `answers_path`."""
    _block_imports()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # the TF1 loader's deprecation warning
    with open(requests_path, encoding="utf-8") as f:
        requests = json.load(f)
    server = _Server(model_dir)
    answers = []
    for request in requests:
        try:
            answers.append(server.answer(request))
        except (ServingError, tf.errors.OpError) as e:
            answers.append({"error": e.message if isinstance(e, tf.errors.OpError)
                            else str(e)})
    modules = sorted(m for m in sys.modules if m.split(".")[0] in _BLOCKED)
    with open(answers_path, "w", encoding="utf-8") as f:
        json.dump({"answers": answers, "modules": modules}, f)
    return 0


# ------------------------------------------------------- the checking process ----

def run_server(export_dir, requests):
    """Runs `requests` in a fresh server process on the version directory `export_dir`.

    Args:
        export_dir: the SavedModel version directory to load.
        requests: dicts with a `kind`: `tensors` (`signature`, `inputs` of `pack`ed
            arrays), `grpc` (`request`: a base64 serialized PredictRequest), `rest`
            (`body`: the JSON text) or `warmup` (`path` of the warm-up file).

    Returns:
        (answers, modules, error): one answer per request, the blocked modules the
        server imported anyway, and None; or (None, None, the server's last line of
        stderr) when the server process failed.
    """
    with tempfile.TemporaryDirectory(prefix="check-serving-") as tmp:
        requests_path = os.path.join(tmp, "requests.json")
        answers_path = os.path.join(tmp, "answers.json")
        with open(requests_path, "w", encoding="utf-8") as f:
            json.dump(requests, f)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL",
                                                                      "2")}
        # By path, not `-m kgreedy.serving.tf_server`: that would import the kgreedy
        # package before the blocker is in place.
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), export_dir,
                               requests_path, answers_path],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(answers_path):
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return None, None, f"exit status {proc.returncode}: {tail[:300]}"
        with open(answers_path, encoding="utf-8") as f:
            result = json.load(f)
    return result["answers"], result["modules"], None


if __name__ == "__main__":
    # Run as a script, this file's directory heads sys.path, where export.py and its
    # siblings would shadow any top-level module of the same name TensorFlow imports.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    raise SystemExit(serve(*sys.argv[1:4]))

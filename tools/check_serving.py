"""Checks an exported SavedModel the way TF Serving uses it, without a TF Serving binary.

    python tools/check_serving.py EXPORT_DIR [--tolerance T] [--seed S]

EXPORT_DIR is a version directory, RUN_DIR/export/MODEL_NAME/VERSION. The tool

1. lists the tag-sets, signatures and input/output specs (as `saved_model_cli show
   --all` does) and checks them against the serving contract (DESIGN.md section 6);
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
"""

import base64
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

# Nothing above may import TensorFlow: the server process installs its import blocker
# first, because `import tensorflow` itself imports keras when it is installed.

SIGNATURES = ("serving_default", "serve_encoded")
INPUTS = {"serving_default": "images", "serve_encoded": "image_bytes"}
OUTPUTS = {"probabilities": "DT_FLOAT", "class_ids": "DT_INT64", "class_names": "DT_STRING"}
PREDICT_METHOD = "tensorflow/serving/predict"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving refuses to load a model with more
_BLOCKED = ("keras", "tf_keras", "kgreedy")
_NUMPY_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32,
                 "DT_INT64": np.int64, "DT_UINT8": np.uint8, "DT_BOOL": np.bool_,
                 "DT_STRING": object}


class ServingError(Exception):
    """A request that TF Serving answers with an error (HTTP 400, INVALID_ARGUMENT)."""


# ------------------------------------------------------ arrays across processes ----

def _pack(array):
    """A numpy array as JSON (the two processes exchange requests and answers as JSON)."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        return {"dtype": "string", "shape": list(array.shape),
                "items": [base64.b64encode(bytes(b)).decode() for b in array.reshape(-1)]}
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()}


def _unpack(packed):
    if packed["dtype"] == "string":
        items = np.empty(len(packed["items"]), object)
        items[:] = [base64.b64decode(item) for item in packed["items"]]
        return items.reshape(packed["shape"])
    return np.frombuffer(base64.b64decode(packed["data"]),
                         packed["dtype"]).reshape(packed["shape"]).copy()


# ---------------------------------------------------- REST, as TF Serving does it ----

def _is_b64(value):
    return isinstance(value, dict) and list(value) == ["b64"] and isinstance(value["b64"], str)


def _json_to_array(value, dtype_name, where):
    """A JSON value (nested lists) as an array of the signature's dtype.

    Follows TF Serving's json_tensor.cc: numbers for numeric tensors (integers only for
    integer ones), strings or `{"b64": ...}` for string tensors, and every list at one
    depth of the same length.
    """
    if dtype_name not in _NUMPY_DTYPES:
        raise ServingError(f"{where}: tensors of type {dtype_name} are not supported here")

    def shape_of(v):
        if isinstance(v, list):
            shapes = [shape_of(item) for item in v]
            if any(s != shapes[0] for s in shapes):
                raise ServingError(f"{where}: lists of different lengths at one depth "
                                   "(all instances must have the same shape)")
            return [len(v)] + (shapes[0] if shapes else [])
        return []

    def leaves(v):
        if isinstance(v, list):
            for item in v:
                yield from leaves(item)
            return
        if dtype_name == "DT_STRING":
            if _is_b64(v):
                try:
                    yield base64.b64decode(v["b64"], validate=True)
                except ValueError:
                    raise ServingError(f"{where}: JSON value {v!r} is not valid base64") \
                        from None
            elif isinstance(v, str):
                yield v.encode("utf-8")
            else:
                raise ServingError(f"{where}: JSON value {v!r} is not of expected type: "
                                   "string")
        elif isinstance(v, bool) != (dtype_name == "DT_BOOL") or not isinstance(
                v, (int, float)) or (dtype_name not in ("DT_FLOAT", "DT_DOUBLE")
                                     and isinstance(v, float)):
            raise ServingError(f"{where}: JSON value {v!r} is not of expected type: "
                               f"{dtype_name}")
        else:
            yield v

    shape = shape_of(value)
    flat = list(leaves(value))
    if dtype_name == "DT_STRING":
        array = np.empty(len(flat), object)
        array[:] = flat
    else:
        array = np.array(flat, _NUMPY_DTYPES[dtype_name])
    return array.reshape(shape)


def _rest_inputs(body, signature):
    """The input tensors of a REST predict body, for the SignatureDef `signature`."""
    specs = {name: info["dtype"] for name, info in signature["inputs"].items()}
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
                        or set(instance) != set(specs):
                    raise ServingError(f"instances[{i}]: expected an object with the keys "
                                       f"{sorted(specs)}; received {instance!r:.80}")
            values = {name: [instance[name] for instance in instances] for name in specs}
        elif len(specs) != 1:
            raise ServingError("instances is a plain list, but the signature has several "
                               f"inputs {sorted(specs)}: send a list of objects")
        else:
            values = {next(iter(specs)): instances}
    else:
        columns = body["inputs"]
        if isinstance(columns, dict) and not _is_b64(columns):
            if set(columns) != set(specs):
                raise ServingError(f"'inputs' has the keys {sorted(columns)}; the signature "
                                   f"has the inputs {sorted(specs)}")
            values = columns
        elif len(specs) != 1:
            raise ServingError("'inputs' is not an object, but the signature has several "
                               f"inputs {sorted(specs)}")
        else:
            values = {next(iter(specs)): columns}
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
            spec = {"inputs": {k: {"dtype": _dtype_name(v.dtype)}
                               for k, v in signature.inputs.items()}}
            outputs = self.run(name, _rest_inputs(body, spec))
            return 200, json.dumps(_rest_outputs(outputs, row="instances" in body))
        except (ServingError, ValueError, self.tf.errors.OpError) as e:
            message = e.message if isinstance(e, self.tf.errors.OpError) else str(e)
            return 400, json.dumps({"error": message})

    def warmup(self, model_dir):
        """Replays the warm-up records as TF Serving does at load time."""
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(model_dir, WARMUP_FILE)
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


def _dtype_name(enum_value):
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum_value)


def _serve(model_dir, requests_path, answers_path):
    """The server process: answers every request of `requests_path` into `answers_path`."""
    _block_imports()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # the TF1 loader's deprecation warning
    with open(requests_path, encoding="utf-8") as f:
        requests = json.load(f)
    server = _Server(model_dir)
    answers = []
    for request in requests:
        kind = request["kind"]
        try:
            if kind == "tensors":
                outputs = server.run(request["signature"],
                                     {k: _unpack(v) for k, v in request["inputs"].items()})
                answers.append({"outputs": {k: _pack(v) for k, v in outputs.items()}})
            elif kind == "grpc":
                response = server.predict(base64.b64decode(request["request"]))
                answers.append({"response": base64.b64encode(response).decode()})
            elif kind == "rest":
                status, body = server.rest(request["body"])
                answers.append({"status": status, "body": body})
            else:
                answers.append({"records": server.warmup(model_dir)})
        except (ServingError, tf.errors.OpError) as e:
            answers.append({"error": e.message if isinstance(e, tf.errors.OpError)
                            else str(e)})
    modules = sorted(m for m in sys.modules if m.split(".")[0] in _BLOCKED)
    with open(answers_path, "w", encoding="utf-8") as f:
        json.dump({"answers": answers, "modules": modules}, f)
    return 0


# ------------------------------------------------------------------- inspection ----

def _check_export_dir(export_dir):
    """Raises KgreedyError unless `export_dir` holds a SavedModel file.

    Runs before TensorFlow is imported, so that a mistyped path gives one line and
    not TensorFlow's start-up chatter as well.
    """
    from kgreedy.base.errors import KgreedyError

    if not os.path.isdir(export_dir):
        raise KgreedyError("EXPORT_DIR", "not a directory", export_dir)
    pb, pbtxt = (os.path.join(export_dir, name)
                 for name in ("saved_model.pb", "saved_model.pbtxt"))
    if not (os.path.isfile(pb) or os.path.isfile(pbtxt)):
        versions = sorted(int(n) for n in os.listdir(export_dir)
                          if n.isascii() and n.isdigit() and os.path.isdir(
                              os.path.join(export_dir, n, "")))
        hint = (f"; it holds versions {versions}: pass a version directory such as "
                f"{os.path.join(export_dir, str(versions[-1]))}" if versions else "")
        raise KgreedyError("EXPORT_DIR", f"not a SavedModel directory (no saved_model.pb)"
                           f"{hint}", export_dir)


def _read_saved_model(export_dir):
    """The SavedModel proto of `export_dir`; KgreedyError when it cannot be parsed."""
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    from kgreedy.base.errors import KgreedyError

    pb, pbtxt = (os.path.join(export_dir, name)
                 for name in ("saved_model.pb", "saved_model.pbtxt"))
    saved_model = saved_model_pb2.SavedModel()
    try:
        if os.path.isfile(pb):
            with open(pb, "rb") as f:
                saved_model.ParseFromString(f.read())
        else:
            with open(pbtxt, encoding="utf-8") as f:
                text_format.Parse(f.read(), saved_model)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        raise KgreedyError("EXPORT_DIR", f"the SavedModel file cannot be parsed ({e})",
                           export_dir) from None
    return saved_model


def _shape_of(tensor_info):
    if tensor_info.tensor_shape.unknown_rank:
        return None
    return [d.size for d in tensor_info.tensor_shape.dim]


def _format_shape(shape):
    if shape is None:
        return "unknown_rank"
    return "(" + ", ".join(str(d) for d in shape) + ")"


def show_all(saved_model):
    """The tag-sets and SignatureDefs as `saved_model_cli show --all` lists them."""
    lines = []
    for meta_graph in saved_model.meta_graphs:
        tags = ", ".join(sorted(meta_graph.meta_info_def.tags))
        lines.append(f"MetaGraphDef with tag-set: '{tags}' contains the following "
                     "SignatureDefs:")
        for key in sorted(meta_graph.signature_def):
            signature = meta_graph.signature_def[key]
            lines += ["", f"signature_def['{key}']:"]
            for kind in ("inputs", "outputs"):
                lines.append("  The given SavedModel SignatureDef contains the following "
                             f"{kind[:-1]}(s):")
                for name in sorted(getattr(signature, kind)):
                    info = getattr(signature, kind)[name]
                    lines += [f"    {kind}['{name}'] tensor_info:",
                              f"        dtype: {_dtype_name(info.dtype)}",
                              f"        shape: {_format_shape(_shape_of(info))}",
                              f"        name: {info.name}"]
            lines.append(f"  Method name is: {signature.method_name}")
        lines.append("")
    return "\n".join(lines)


def _signature_specs(meta_graph):
    """{signature: {"inputs"/"outputs": {name: {"dtype", "shape"}}}} of a MetaGraphDef."""
    return {key: {kind: {name: {"dtype": _dtype_name(info.dtype), "shape": _shape_of(info)}
                         for name, info in getattr(signature, kind).items()}
                  for kind in ("inputs", "outputs")}
            for key, signature in meta_graph.signature_def.items()}


def _contract_problems(name, signature, method_name, num_classes):
    """What in one signature departs from DESIGN.md section 6 (empty when nothing)."""
    problems = []
    inputs, outputs = signature["inputs"], signature["outputs"]
    want_input = INPUTS[name]
    if list(inputs) != [want_input]:
        problems.append(f"inputs are {sorted(inputs)}, expected ['{want_input}']")
    else:
        info = inputs[want_input]
        dtype, shape = info["dtype"], info["shape"]
        if name == "serving_default":
            ok = (dtype == "DT_FLOAT" and shape is not None and len(shape) == 4
                  and shape[0] == -1 and shape[3] > 0 and (shape[1] == -1) == (shape[2] == -1))
            want = "DT_FLOAT (-1, H, W, C) with C known"
        else:
            ok = dtype == "DT_STRING" and shape == [-1]
            want = "DT_STRING (-1)"
        if not ok:
            problems.append(f"input {want_input} is {dtype} {_format_shape(shape)}, "
                            f"expected {want}")
    if set(outputs) != set(OUTPUTS):
        problems.append(f"outputs are {sorted(outputs)}, expected {sorted(OUTPUTS)}")
    else:
        for key, dtype in OUTPUTS.items():
            shape = outputs[key]["shape"]
            want_shape = [-1, num_classes] if key == "probabilities" else [-1]
            if outputs[key]["dtype"] != dtype or shape != want_shape:
                problems.append(f"output {key} is {outputs[key]['dtype']} "
                                f"{_format_shape(shape)}, expected {dtype} "
                                f"{_format_shape(want_shape)}")
    if method_name != PREDICT_METHOD:
        problems.append(f"method name is {method_name!r}, expected {PREDICT_METHOD!r}")
    return problems


# ---------------------------------------------------------------------- checking ----

class _Report:
    """Collects one PASS/FAIL line per check."""

    def __init__(self):
        self.lines = []
        self.failed = 0

    def add(self, name, ok, detail=""):
        self.failed += not ok
        self.lines.append(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail
                                                                   else ""))


def _agreement(got, want, tolerance):
    """(ok, detail): whether serving outputs `got` agree with the reference `want`."""
    if got is None:
        return False, "no answer"
    if "error" in got:
        return False, f"error: {str(got['error']).strip().splitlines()[-1][:300]}"
    if set(got) != set(OUTPUTS):
        return False, f"outputs {sorted(got)}, expected {sorted(OUTPUTS)}"
    want_probs = np.asarray(want["probabilities"])
    try:
        probs = np.asarray(got["probabilities"], np.float64)
    except (TypeError, ValueError):
        return False, f"probabilities are not numbers: {str(got['probabilities'])[:200]}"
    if probs.shape != want_probs.shape:
        return False, f"probabilities of shape {probs.shape}, expected {want_probs.shape}"
    # A broken model may output NaN; the serving path must then give NaN at the same
    # places, and it is said in the detail.
    nan = np.isnan(want_probs)
    if not np.array_equal(np.isnan(probs), nan):
        return False, "NaN probabilities where the reference has numbers, or the reverse"
    diff = float(np.max(np.abs(probs - want_probs)[~nan])) if (~nan).any() else 0.0
    if not diff <= tolerance:
        return False, f"max |probability difference| {diff:.3g} > {tolerance:g}"
    note = f" (the model outputs NaN for {int(nan.any(-1).sum())} samples)" if nan.any() else ""
    ids, want_ids = np.asarray(got["class_ids"]), np.asarray(want["class_ids"])
    ranked = np.sort(want_probs, axis=-1)
    # Near-ties may flip within the tolerance; anything else must name the same class.
    margin = ranked[:, -1] - ranked[:, -2] if ranked.shape[-1] > 1 else np.ones(len(ids))
    if ids.shape != want_ids.shape or np.any((ids != want_ids) & (margin > tolerance)):
        return False, f"class_ids {ids.tolist()}, expected {want_ids.tolist()}"
    names = [n if isinstance(n, bytes) else str(n).encode() for n in
             np.asarray(got["class_names"], object).reshape(-1)]
    want_names = list(np.asarray(want["class_names"], object).reshape(-1))
    same = ids == want_ids
    if len(names) != len(want_names) or any(
            a != b for a, b, s in zip(names, want_names, same) if s):
        return False, f"class_names {names}, expected {want_names}"
    return True, f"max |probability difference| {diff:.1e}{note}"


def _refusal(answer):
    """(ok, detail) for a malformed request: it must get an error, not an answer."""
    if answer is None:
        return False, "no answer"
    error = answer.get("error")
    if error is None and answer.get("status", 200) != 200:
        error = json.loads(answer["body"]).get("error")
    if error is None:
        return False, "answered instead of refusing"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(("[[", "Graph execution"))]
    return True, f"refused: {(informative or lines or [''])[0][:200]}"


def _from_rest(answer, row):
    if answer is None:
        return None
    body = json.loads(answer["body"])
    if answer["status"] != 200 or "error" in body:
        return {"error": body.get("error", f"HTTP {answer['status']}")}
    if row:
        predictions = body.get("predictions")
        if not isinstance(predictions, list) or not all(isinstance(p, dict)
                                                        for p in predictions):
            return {"error": f"unexpected row response {str(body)[:200]}"}
        keys = set().union(*predictions)
        return {k: [p.get(k) for p in predictions] for k in keys}
    outputs = body.get("outputs")
    if not isinstance(outputs, dict):
        return {"error": f"unexpected columnar response {str(body)[:200]}"}
    return outputs


def _from_grpc(answer):
    from tensorflow_serving.apis import predict_pb2
    import tensorflow as tf

    if answer is None or "error" in answer:
        return answer
    response = predict_pb2.PredictResponse.FromString(base64.b64decode(answer["response"]))
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _from_tensors(answer):
    if answer is None or "error" in answer:
        return answer
    return {k: _unpack(v) for k, v in answer["outputs"].items()}


def _warmup_records(export_dir):
    """The warm-up file's records as PredictionLogs (raises on a malformed file)."""
    from tensorflow_serving.apis import prediction_log_pb2
    import tensorflow as tf

    path = os.path.join(export_dir, WARMUP_FILE)
    return [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(path)]


def _check_warmup_file(report, export_dir, specs):
    """Checks the warm-up file's records against the signatures; returns the records."""
    import tensorflow as tf

    name = "warm-up file"
    if not os.path.isfile(os.path.join(export_dir, WARMUP_FILE)):
        report.add(name, False, f"{WARMUP_FILE} is missing")
        return []
    try:
        records = _warmup_records(export_dir)
    except (tf.errors.OpError, ValueError) as e:  # DecodeError is a ValueError
        report.add(name, False, f"{WARMUP_FILE} is not a TFRecord of PredictionLogs: {e}")
        return []
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
        have = {k: _dtype_name(v.dtype) for k, v in request.inputs.items()}
        if have != {k: v["dtype"] for k, v in inputs.items()}:
            problems.append(f"record {i} ({signature}) has inputs {have}, the signature "
                            f"{ {k: v['dtype'] for k, v in inputs.items()} }")
    missing = [s for s in SIGNATURES if s not in covered]
    if missing:
        problems.append(f"no record for {missing}")
    report.add(name, not problems, "; ".join(problems) or
               f"{len(records)} PredictionLog records for {sorted(covered)}")
    return records


def _model_size(signature_shape, records, tf):
    """(height, width) of the samples: the signature's, else the warm-up request's."""
    if signature_shape[1] > 0 and signature_shape[2] > 0:
        return signature_shape[1], signature_shape[2]
    for log in records:
        request = log.predict_log.request
        if request.model_spec.signature_name == "serving_default" and "images" in request.inputs:
            shape = tf.make_ndarray(request.inputs["images"]).shape
            if len(shape) == 4:
                return shape[1], shape[2]
    return 32, 32


def _request(kind, **fields):
    return {"kind": kind, **fields}


def _grpc_request(model_name, signature, inputs):
    from tensorflow_serving.apis import predict_pb2
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return _request("grpc", request=base64.b64encode(request.SerializeToString()).decode())


def _rest_request(body):
    return _request("rest", body=json.dumps(body))


def _b64(data):
    return {"b64": base64.b64encode(data).decode()}


def _run_server(export_dir, requests):
    """Runs the requests in a fresh server process; (answers, modules, error)."""
    with tempfile.TemporaryDirectory(prefix="check-serving-") as tmp:
        requests_path = os.path.join(tmp, "requests.json")
        answers_path = os.path.join(tmp, "answers.json")
        with open(requests_path, "w", encoding="utf-8") as f:
            json.dump(requests, f)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL",
                                                                      "2")}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve",
                               export_dir, requests_path, answers_path],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(answers_path):
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return None, None, f"exit status {proc.returncode}: {tail[:300]}"
        with open(answers_path, encoding="utf-8") as f:
            result = json.load(f)
    return result["answers"], result["modules"], None


def check(export_dir, tolerance=1e-4, seed=0, out=print):
    """Runs every check on the version directory `export_dir`.

    Args:
        export_dir: RUN_DIR/export/MODEL_NAME/VERSION.
        tolerance: largest accepted difference of probabilities.
        seed: seeds the random sample pixels.
        out: prints the listing and the summary lines.

    Returns:
        The number of failed checks.

    Raises:
        KgreedyError: `export_dir` is not a SavedModel, or tensorflow-serving-api is
            missing.
    """
    from kgreedy.base.errors import KgreedyError

    export_dir = os.path.abspath(export_dir)
    _check_export_dir(export_dir)
    saved_model = _read_saved_model(export_dir)
    try:
        import tensorflow_serving.apis.predict_pb2  # noqa: F401
    except ImportError:
        raise KgreedyError("tensorflow-serving-api", "is needed to build the requests: "
                           "pip install tensorflow-serving-api") from None
    import tensorflow as tf

    out(show_all(saved_model))
    report = _Report()

    # Layout and contract, from the files alone.
    version = os.path.basename(export_dir)
    layout = []
    if not (version.isascii() and version.isdigit() and int(version) > 0):
        layout.append(f"the directory name {version!r} is not a positive integer version")
    if not os.path.isfile(os.path.join(export_dir, "variables", "variables.index")):
        layout.append("variables/variables.index is missing")
    report.add("layout", not layout, "; ".join(layout) or
               f"version {version} of model {os.path.basename(os.path.dirname(export_dir))}")
    serve = [m for m in saved_model.meta_graphs if set(m.meta_info_def.tags) == {"serve"}]
    report.add("tag-set 'serve'", bool(serve), "" if serve else "no MetaGraphDef with "
               f"exactly the tag 'serve'; tag-sets: "
               f"{[sorted(m.meta_info_def.tags) for m in saved_model.meta_graphs]}")
    if not serve:
        return _finish(report, out)
    meta_graph = serve[0]
    specs = _signature_specs(meta_graph)
    probs_shape = (specs.get("serving_default", {}).get("outputs", {})
                   .get("probabilities", {}).get("shape") or [-1, -1])
    num_classes = probs_shape[-1] if len(probs_shape) == 2 else -1
    for name in SIGNATURES:
        if name not in specs:
            report.add(f"signature {name}", False, f"missing; signatures: {sorted(specs)}")
            continue
        problems = _contract_problems(name, specs[name],
                                      meta_graph.signature_def[name].method_name, num_classes)
        report.add(f"signature {name}", not problems, "; ".join(problems) or "as DESIGN.md §6")
    records = _check_warmup_file(report, export_dir, specs)
    if any(line.startswith("FAIL  signature") for line in report.lines):
        return _finish(report, out)  # the requests below need the contract's signatures

    # Sample inputs: raw pixels of the model's size and their PNG and JPEG files. The
    # pixel ranges vary so that models trained on 0..16 (digits) and on 0..255 (photos)
    # both see some inputs in their range.
    images_shape = specs["serving_default"]["inputs"]["images"]["shape"]
    channels = images_shape[3]
    height, width = _model_size(images_shape, records, tf)
    resizes = images_shape[1] == -1
    rng = np.random.default_rng(seed)
    pixels = np.stack([rng.integers(0, high + 1, [height, width, channels])
                       for high in (255, 16, 64, 255)]).astype(np.uint8)
    x = pixels.astype(np.float32)
    pngs = np.array([tf.io.encode_png(p).numpy() for p in pixels], object)
    jpegs = np.array([tf.io.encode_jpeg(p, quality=90).numpy() for p in pixels], object)
    # kgreedy's exports decode JPEGs with the accurate DCT (kgreedy.images), as PIL does.
    x_jpeg = np.stack([tf.io.decode_jpeg(j, channels=channels,
                                         dct_method="INTEGER_ACCURATE").numpy()
                       for j in jpegs]).astype(np.float32)
    if resizes:  # another size: the signature says the model resizes
        other = rng.integers(0, 256, [2, height + height // 2 + 1, width + width // 3 + 2,
                                      channels]).astype(np.uint8)
        x_other = other.astype(np.float32)
        pngs_other = np.array([tf.io.encode_png(p).numpy() for p in other], object)

    # The reference: the model loaded in this process.
    try:
        loaded = tf.saved_model.load(export_dir)
        default, encoded = (loaded.signatures[s] for s in SIGNATURES)

        def numpy(outputs):
            return {k: v.numpy() for k, v in outputs.items()}

        want = {"pixels": numpy(default(images=tf.constant(x))),
                "png": numpy(encoded(image_bytes=tf.constant(pngs))),
                "jpeg": numpy(encoded(image_bytes=tf.constant(jpegs))),
                "jpeg pixels": numpy(default(images=tf.constant(x_jpeg)))}
        if resizes:
            want["other pixels"] = numpy(default(images=tf.constant(x_other)))
            want["other png"] = numpy(encoded(image_bytes=tf.constant(pngs_other)))
    except (tf.errors.OpError, ValueError, KeyError, OSError) as e:
        report.add("tf.saved_model.load in this process", False, f"{type(e).__name__}: {e}")
        return _finish(report, out)
    size = f"{height}x{width}x{channels}"
    report.add(f"serve_encoded(PNG) = serving_default(same pixels), in memory, {size}",
               *_agreement(want["png"], want["pixels"], tolerance))
    report.add("serve_encoded(JPEG) = serving_default(decoded JPEG pixels), in memory",
               *_agreement(want["jpeg"], want["jpeg pixels"], tolerance))
    if resizes:
        report.add(f"serve_encoded(PNG) = serving_default(same pixels), in memory, "
                   f"{x_other.shape[1]}x{x_other.shape[2]} (resized)",
                   *_agreement(want["other png"], want["other pixels"], tolerance))

    # What the server is asked: name, request, how to read the answer, the reference.
    model = os.path.basename(os.path.dirname(export_dir)) or "model"
    b64_jpegs = [_b64(j) for j in jpegs]
    b64_pngs = [_b64(p) for p in pngs]
    cases = [
        ("session serving_default, by tensor names",
         _request("tensors", signature="serving_default", inputs={"images": _pack(x)}),
         _from_tensors, "pixels"),
        ("session serve_encoded PNG, by tensor names",
         _request("tensors", signature="serve_encoded", inputs={"image_bytes": _pack(pngs)}),
         _from_tensors, "png"),
        ("session serve_encoded JPEG, by tensor names",
         _request("tensors", signature="serve_encoded", inputs={"image_bytes": _pack(jpegs)}),
         _from_tensors, "jpeg"),
        ("gRPC PredictRequest serving_default",
         _grpc_request(model, "serving_default", {"images": x}), _from_grpc, "pixels"),
        ("gRPC PredictRequest serve_encoded JPEG",
         _grpc_request(model, "serve_encoded", {"image_bytes": jpegs}), _from_grpc, "jpeg"),
        ("REST row serving_default (instances of numbers)",
         _rest_request({"signature_name": "serving_default", "instances": x.tolist()}),
         lambda a: _from_rest(a, True), "pixels"),
        ("REST columnar serving_default (inputs)",
         _rest_request({"signature_name": "serving_default",
                        "inputs": {"images": x.tolist()}}),
         lambda a: _from_rest(a, False), "pixels"),
        ("REST row serve_encoded (instances of b64 JPEG)",
         _rest_request({"signature_name": "serve_encoded", "instances": b64_jpegs}),
         lambda a: _from_rest(a, True), "jpeg"),
        ("REST row serve_encoded (named instances of b64 PNG)",
         _rest_request({"signature_name": "serve_encoded",
                        "instances": [{"image_bytes": b} for b in b64_pngs]}),
         lambda a: _from_rest(a, True), "png"),
        ("REST columnar serve_encoded (inputs of b64 PNG)",
         _rest_request({"signature_name": "serve_encoded", "inputs": b64_pngs}),
         lambda a: _from_rest(a, False), "png"),
    ]
    if resizes:
        cases.append((f"REST row serve_encoded at {x_other.shape[1]}x{x_other.shape[2]}",
                      _rest_request({"signature_name": "serve_encoded",
                                     "instances": [_b64(p) for p in pngs_other]}),
                      lambda a: _from_rest(a, True), "other png"))
    wrong_channels = np.zeros([1, height, width, channels + 1], np.float32)
    truncated = bytes(jpegs[0][:len(jpegs[0]) // 2])
    refusals = [
        ("refuses serving_default with a wrong channel count",
         _rest_request({"instances": wrong_channels.tolist()})),
        ("refuses serving_default without the channel axis (wrong rank)",
         _rest_request({"instances": x[..., 0].tolist()})),
        ("refuses serving_default with int32 instead of float32 (gRPC)",
         _grpc_request(model, "serving_default", {"images": pixels.astype(np.int32)})),
        ("refuses serve_encoded with bytes that are no image",
         _rest_request({"signature_name": "serve_encoded",
                        "instances": [_b64(b"this is not an image")]})),
        ("refuses serve_encoded with a truncated JPEG",
         _rest_request({"signature_name": "serve_encoded", "instances": [_b64(truncated)]})),
        ("refuses serve_encoded with a scalar instead of a batch",
         _request("tensors", signature="serve_encoded",
                  inputs={"image_bytes": _pack(np.array(jpegs[0], object))})),
    ]
    if not resizes:
        wrong_size = np.zeros([1, height + 1, width, channels], np.uint8)
        refusals += [
            ("refuses serving_default of another image size (the model does not resize)",
             _rest_request({"instances": wrong_size.astype(np.float32).tolist()})),
            ("refuses serve_encoded of another image size (the model does not resize)",
             _rest_request({"signature_name": "serve_encoded",
                            "instances": [_b64(tf.io.encode_png(wrong_size[0]).numpy())]}))]
    requests = ([request for _, request, _, _ in cases] + [r for _, r in refusals]
                + [_request("warmup")])
    answers, modules, error = _run_server(export_dir, requests)
    report.add("server process: TF1 session loader, tag 'serve', no keras or kgreedy",
               error is None and modules == [],
               error or (f"imported {modules}" if modules else "loaded"))
    answers = answers or [None] * len(requests)
    for (name, _, read, key), answer in zip(cases, answers):
        report.add(name, *_agreement(read(answer), want[key], tolerance))
    for (name, _), answer in zip(refusals, answers[len(cases):]):
        report.add(name, *_refusal(answer))
    warmup = answers[-1]
    replayed = (warmup or {}).get("records")
    bad = [r for r in replayed or [] if "error" in r]
    report.add("warm-up records run in the server", bool(replayed) and not bad,
               (f"{len(replayed)} records ran" if replayed and not bad else
                f"{bad[0].get('signature')}: {bad[0]['error'][:300]}" if bad else
                str((warmup or {}).get("error", "no records"))[:300]))
    return _finish(report, out)


def _finish(report, out):
    out("Checks:")
    for line in report.lines:
        out(line)
    total = len(report.lines)
    out(f"{total - report.failed} of {total} checks passed" if report.failed
        else f"all {total} checks passed")
    return report.failed


def main(argv=None):
    """`python tools/check_serving.py EXPORT_DIR [--tolerance T] [--seed S]`."""
    from kgreedy import cli

    parser = cli.ArgumentParser(
        prog="python tools/check_serving.py",
        description="Check an exported SavedModel version directory the way TF Serving "
                    "loads and answers it (no server needed). Exit 0 when every check "
                    "passes, 1 otherwise.")
    parser.add_argument("export_dir", metavar="EXPORT_DIR",
                        help="version directory, RUN_DIR/export/MODEL_NAME/VERSION")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted difference of probabilities (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample pixels")
    args = parser.parse_args(argv)
    if not args.tolerance >= 0:
        cli.fail(f"--tolerance: must be >= 0; received {args.tolerance!r}")
    return cli.EXIT_FAILURE if check(args.export_dir, args.tolerance, args.seed) \
        else cli.EXIT_OK


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        raise SystemExit(_serve(*sys.argv[2:5]))
    from kgreedy import cli as _cli

    raise SystemExit(_cli.run(main))

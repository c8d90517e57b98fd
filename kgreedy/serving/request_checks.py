"""The requests a serving check sends, and how their answers are judged.

A client of TF Serving sends one of three things: tensors fed by the SignatureDef's
names (what the C++ server does with every request), a `PredictRequest` over gRPC, or
a REST body in row (`instances`) or columnar (`inputs`) format with `{"b64": ...}` for
bytes. Each path converts types and shapes in its own way, so each is exercised on the
same sample images and compared with the model loaded in the checking process:
raw pixels of the model's input shape, and their PNG and JPEG encodings (and, for a
model that resizes, images of another size). Malformed requests (wrong channel count,
rank, dtype or size; bytes that are no image; a scalar instead of a batch) must be
refused: TF Serving makes no checks of its own, so a graph that answers them answers
nonsense in production.

The requests and answers are the JSON of `kgreedy.serving.tf_server.run_server`;
building gRPC requests and reading gRPC answers needs tensorflow-serving-api.
"""

import base64
import dataclasses
import json
from typing import Optional

import numpy as np

from kgreedy.serving.tf_server import pack, unpack


# ------------------------------------------------------------ sample inputs ----

@dataclasses.dataclass
class Samples:
    """Sample images and their encodings.

    Attributes:
        pixels: uint8 [4, H, W, C] at the model's size.
        pngs: their PNG files, object [4].
        jpegs: their JPEG files, object [4].
        jpeg_pixels: float32 [4, H, W, C], the JPEGs decoded as the export decodes them.
        other: uint8 [2, H', W', C] of another size, when the model resizes; else None.
        other_pngs: their PNG files, or None.
    """
    pixels: np.ndarray
    pngs: np.ndarray
    jpegs: np.ndarray
    jpeg_pixels: np.ndarray
    other: Optional[np.ndarray] = None
    other_pngs: Optional[np.ndarray] = None

    @property
    def x(self):
        """The pixels as the float32 batch `serving_default` takes."""
        return self.pixels.astype(np.float32)

    @property
    def x_other(self):
        return self.other.astype(np.float32)

    @property
    def resizes(self):
        return self.other is not None


def make_samples(height, width, channels, resizes, seed):
    """Random `Samples` of height x width x channels; `resizes` adds another size."""
    import tensorflow as tf

    def encode_png(images):
        return np.array([tf.io.encode_png(image).numpy() for image in images], object)

    rng = np.random.default_rng(seed)
    # Pixel ranges vary so that models trained on 0..16 (digits) and on 0..255
    # (photos) both see some inputs in their range.
    pixels = np.stack([rng.integers(0, high + 1, [height, width, channels])
                       for high in (255, 16, 64, 255)]).astype(np.uint8)
    jpegs = np.array([tf.io.encode_jpeg(p, quality=90).numpy() for p in pixels], object)
    # kgreedy's exports decode JPEGs with the accurate DCT (kgreedy.data.images), as
    # PIL does.
    jpeg_pixels = np.stack([tf.io.decode_jpeg(j, channels=channels,
                                              dct_method="INTEGER_ACCURATE").numpy()
                            for j in jpegs]).astype(np.float32)
    samples = Samples(pixels, encode_png(pixels), jpegs, jpeg_pixels)
    if resizes:
        samples.other = rng.integers(0, 256, [2, height + height // 2 + 1,
                                              width + width // 3 + 2,
                                              channels]).astype(np.uint8)
        samples.other_pngs = encode_png(samples.other)
    return samples


# ---------------------------------------------------------------- requests ----

def _request(kind, **fields):
    return {"kind": kind, **fields}


def tensors_request(signature, inputs):
    """Arrays fed by the SignatureDef's tensor names, as TF Serving's C++ server does."""
    return _request("tensors", signature=signature,
                    inputs={k: pack(v) for k, v in inputs.items()})


def grpc_request(model_name, signature, inputs):
    """A serialized `PredictRequest`, as a gRPC client sends it."""
    from tensorflow_serving.apis import predict_pb2
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return _request("grpc", request=base64.b64encode(request.SerializeToString()).decode())


def rest_request(body):
    """A REST predict body."""
    return _request("rest", body=json.dumps(body))


def warmup_request(path):
    """Replaying the warm-up file at `path`."""
    return _request("warmup", path=path)


def _b64(data):
    return {"b64": base64.b64encode(data).decode()}


# ------------------------------------------------------------------ answers ----

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


def _from_rows(answer):
    return _from_rest(answer, True)


def _from_columns(answer):
    return _from_rest(answer, False)


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
    return {k: unpack(v) for k, v in answer["outputs"].items()}


def agreement(got, want, tolerance):
    """(ok, detail): whether serving outputs `got` agree with the reference `want`."""
    if got is None:
        return False, "no answer"
    if "error" in got:
        return False, f"error: {str(got['error']).strip().splitlines()[-1][:300]}"
    if set(got) != set(want):
        return False, f"outputs {sorted(got)}, expected {sorted(want)}"
    if "exit_stage" in want and not np.array_equal(np.asarray(got["exit_stage"]).reshape(-1),
                                                   np.asarray(want["exit_stage"])):
        return False, (f"exit_stage {np.asarray(got['exit_stage']).tolist()}, expected "
                       f"{np.asarray(want['exit_stage']).tolist()}")
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


def refusal(answer):
    """(ok, detail) for a malformed request: it must get an error, not an answer."""
    if answer is None:
        return False, "no answer"
    error = answer.get("error")
    if error is None and answer.get("status", 200) != 200:
        error = json.loads(answer["body"]).get("error")
    if error is None:
        return False, "answered instead of refusing"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # The first line that is not TensorFlow's frame of the error says what went wrong.
    informative = [line for line in lines if not line.startswith(("[[", "Graph execution"))]
    return True, f"refused: {(informative or lines or [''])[0][:200]}"


# -------------------------------------------------------------- the lists ----

def cases(samples, model_name):
    """The well-formed requests: (check name, request, answer reader, reference key).

    The reader turns the server's answer into outputs; the key names the reference
    outputs of `kgreedy.serving.checks` they must agree with.
    """
    s, model = samples, model_name
    b64_jpegs = [_b64(j) for j in s.jpegs]
    b64_pngs = [_b64(p) for p in s.pngs]
    found = [
        ("session serving_default, by tensor names",
         tensors_request("serving_default", {"images": s.x}), _from_tensors, "pixels"),
        ("session serve_encoded PNG, by tensor names",
         tensors_request("serve_encoded", {"image_bytes": s.pngs}), _from_tensors, "png"),
        ("session serve_encoded JPEG, by tensor names",
         tensors_request("serve_encoded", {"image_bytes": s.jpegs}), _from_tensors, "jpeg"),
        ("gRPC PredictRequest serving_default",
         grpc_request(model, "serving_default", {"images": s.x}), _from_grpc, "pixels"),
        ("gRPC PredictRequest serve_encoded JPEG",
         grpc_request(model, "serve_encoded", {"image_bytes": s.jpegs}), _from_grpc, "jpeg"),
        ("REST row serving_default (instances of numbers)",
         rest_request({"signature_name": "serving_default", "instances": s.x.tolist()}),
         _from_rows, "pixels"),
        ("REST columnar serving_default (inputs)",
         rest_request({"signature_name": "serving_default",
                       "inputs": {"images": s.x.tolist()}}),
         _from_columns, "pixels"),
        ("REST row serve_encoded (instances of b64 JPEG)",
         rest_request({"signature_name": "serve_encoded", "instances": b64_jpegs}),
         _from_rows, "jpeg"),
        ("REST row serve_encoded (named instances of b64 PNG)",
         rest_request({"signature_name": "serve_encoded",
                       "instances": [{"image_bytes": b} for b in b64_pngs]}),
         _from_rows, "png"),
        ("REST columnar serve_encoded (inputs of b64 PNG)",
         rest_request({"signature_name": "serve_encoded", "inputs": b64_pngs}),
         _from_columns, "png"),
    ]
    if s.resizes:
        found.append((f"REST row serve_encoded at {s.other.shape[1]}x{s.other.shape[2]}",
                      rest_request({"signature_name": "serve_encoded",
                                    "instances": [_b64(p) for p in s.other_pngs]}),
                      _from_rows, "other png"))
    return found


def refusals(samples, model_name):
    """The malformed requests that must be refused: (check name, request)."""
    import tensorflow as tf

    s = samples
    _, height, width, channels = s.pixels.shape
    wrong_channels = np.zeros([1, height, width, channels + 1], np.float32)
    truncated = bytes(s.jpegs[0][:len(s.jpegs[0]) // 2])
    found = [
        ("refuses serving_default with a wrong channel count",
         rest_request({"instances": wrong_channels.tolist()})),
        ("refuses serving_default without the channel axis (wrong rank)",
         rest_request({"instances": s.x[..., 0].tolist()})),
        ("refuses serving_default with int32 instead of float32 (gRPC)",
         grpc_request(model_name, "serving_default",
                      {"images": s.pixels.astype(np.int32)})),
        ("refuses serve_encoded with bytes that are no image",
         rest_request({"signature_name": "serve_encoded",
                       "instances": [_b64(b"this is not an image")]})),
        ("refuses serve_encoded with a truncated JPEG",
         rest_request({"signature_name": "serve_encoded", "instances": [_b64(truncated)]})),
        ("refuses serve_encoded with a scalar instead of a batch",
         tensors_request("serve_encoded", {"image_bytes": np.array(s.jpegs[0], object)})),
    ]
    if not s.resizes:
        wrong_size = np.zeros([1, height + 1, width, channels], np.uint8)
        found += [
            ("refuses serving_default of another image size (the model does not resize)",
             rest_request({"instances": wrong_size.astype(np.float32).tolist()})),
            ("refuses serve_encoded of another image size (the model does not resize)",
             rest_request({"signature_name": "serve_encoded",
                           "instances": [_b64(tf.io.encode_png(wrong_size[0]).numpy())]}))]
    return found

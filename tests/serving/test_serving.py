"""Tests of serving: encoded inputs, malformed requests, warm-up records,
tools/check_serving.py and kgreedy.predict, on a tiny trained export."""

import base64
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from kgreedy import cli, predict
from kgreedy import data
from kgreedy.model.from_recipe import from_recipe
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.serving import export, warmup_file
from kgreedy.serving import tf_server as check_serving
from kgreedy.serving.checks import check

RECIPE = {"name": "t", "model": {"blocks": [{"width": 8}, {"width": 16, "downsample": "psi"}]},
          "aux": {"k": 2, "width": 8}, "export": {"model_name": "digits"}}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
REPO = str(next(p for p in Path(__file__).resolve().parents if (p / "setup.cfg").is_file()))
CHECK_SERVING = os.path.join(REPO, "tools", "check_serving.py")
CROSS_CHECKS = ("serve_encoded(PNG) = serving_default(same pixels)",
                "serve_encoded(JPEG) = serving_default(decoded JPEG pixels)")


@pytest.fixture(scope="module")
def trained():
    """A tiny 2-stage net, briefly trained on digits; and the digits eval images."""
    keras.utils.set_random_seed(0)
    recipe = recipe_from_dict(RECIPE)
    datasets = data.load(recipe.data, data.describe(recipe.data), batch_size=64)
    spec = datasets.spec
    net = from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean, spec.std)
    for stage in (1, 2):
        model = net.deployed_model(stage)
        model.compile(keras.optimizers.Adam(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(datasets.train, epochs=2, verbose=0, shuffle=False)
    x = np.concatenate([images.numpy() for images, _ in datasets.eval])
    return spec, net, x


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """RUN_DIR/export/digits/1 as training writes it, and the loaded model."""
    spec, net, _ = trained
    root = tmp_path_factory.mktemp("run") / "export" / "digits"
    path = export.export_saved_model(net, spec, str(root))
    return path, tf.saved_model.load(path)


def _pngs(images):
    return tf.stack([tf.io.encode_png(tf.cast(image, tf.uint8)) for image in images])


def _run(fn, **inputs):
    return {k: v.numpy() for k, v in fn(**inputs).items()}


# ------------------------------------------------------------ encoded input ----

def test_serve_encoded_matches_serving_default(trained, exported):
    """PNG is lossless, so both paths see the same pixels; JPEG is compared with the
    pixels it decodes to. Grey images sent as RGB PNGs are converted back."""
    _, net, x = trained
    _, loaded = exported
    default, encoded = loaded.signatures["serving_default"], loaded.signatures["serve_encoded"]
    x = x[:64]
    want = _run(default, images=tf.constant(x))
    assert len(set(want["class_ids"].tolist())) >= 5  # the comparison says something
    got = _run(encoded, image_bytes=_pngs(x))
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(got["class_names"], want["class_names"])
    rgb = _run(encoded, image_bytes=_pngs(np.repeat(x, 3, axis=-1)))
    np.testing.assert_allclose(rgb["probabilities"], want["probabilities"], atol=1e-6)
    # Digits are 0..16; scaled to 0..255 they make JPEGs with something to lose.
    jpegs = tf.stack([tf.io.encode_jpeg(tf.cast(image * 15, tf.uint8), quality=75)
                      for image in x])
    # The export decodes JPEGs with the accurate DCT (kgreedy.data.images).
    decoded = tf.cast(tf.stack([tf.io.decode_jpeg(j, channels=1, dct_method="INTEGER_ACCURATE")
                                for j in jpegs]), tf.float32)
    np.testing.assert_allclose(_run(encoded, image_bytes=jpegs)["probabilities"],
                               _run(default, images=decoded)["probabilities"], atol=1e-6)


@pytest.mark.slow
def test_serve_encoded_converts_grey_to_rgb_and_resizes_like_eval(trained, tmp_path):
    """An RGB model that resizes and crops: grey PNGs of several sizes in one request
    give what serving_default gives for the same pixels repeated to RGB, and what the
    eval transform followed by the Keras model gives."""
    spec, _, _ = trained
    spec = dataclasses.replace(spec, image_shape=(8, 8, 3), eval_resize="resize_crop",
                               mean=spec.mean * 3, std=spec.std * 3)
    net = from_recipe(recipe_from_dict(RECIPE), spec.image_shape, 10, spec.mean, spec.std)
    loaded = tf.saved_model.load(export.export_saved_model(net, spec, str(tmp_path)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 17, [h, w, 1]).astype(np.uint8)
              for h, w in [(8, 8), (12, 9), (20, 30)]]
    got = _run(loaded.signatures["serve_encoded"], image_bytes=tf.stack(
        [tf.io.encode_png(image) for image in images]))["probabilities"]
    for image, probabilities in zip(images, got):
        rgb = np.repeat(image[None].astype(np.float32), 3, axis=-1)
        want = _run(loaded.signatures["serving_default"], images=tf.constant(rgb))
        np.testing.assert_allclose(probabilities, want["probabilities"][0], atol=1e-6)
        keras_out = tf.nn.softmax(net.deployed_model()(data.eval_transform(rgb, spec)))
        np.testing.assert_allclose(probabilities, keras_out[0], atol=1e-5)


# ------------------------------------------------------- malformed requests ----

@pytest.mark.parametrize("images, needle", [
    (np.zeros([8, 8, 1], np.float32), "Shape of tensor images [8,8,1]"),
    (np.zeros([2, 8, 8, 3], np.float32), "Shape of tensor images [2,8,8,3]"),
    (np.zeros([1, 9, 8, 1], np.float32), "Shape of tensor images [1,9,8,1]"),
    (np.zeros([1, 8, 8, 1], np.int32), "expected to be a float tensor but is a int32"),
    (np.zeros([1, 8, 8, 1], np.float64), "expected to be a float tensor but is a double"),
])
def test_malformed_pixels_get_errors(exported, images, needle):
    _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        loaded.signatures["serving_default"](images=tf.constant(images))
    assert needle in info.value.message


def test_malformed_image_bytes_get_errors(trained, exported):
    _, _, x = trained
    _, loaded = exported
    fn = loaded.signatures["serve_encoded"]
    jpeg = tf.io.encode_jpeg(tf.cast(x[0] * 15, tf.uint8)).numpy()
    png = tf.io.encode_png(tf.cast(x[0], tf.uint8)).numpy()
    for bad, needle in [(jpeg[:len(jpeg) // 2], "Invalid JPEG data"),
                        (jpeg[:20] + b"\0" * 200, "Invalid JPEG data"),  # header kept
                        (png[:len(png) // 2], "PNG"),
                        (b"GIF89a\x01\x00\x01\x00-but-not-really", "GIF"),
                        # The header's size is checked first: these bytes declare
                        # 25133x29813 ("-but" read as two sizes), refused undecoded.
                        (b"GIF89a-but-not-really", "25133.*29813.*above the limit"),
                        (b"plain text", "Unknown image file format")]:
        # Among good images, a bad one still fails the whole request: never an answer.
        with pytest.raises(tf.errors.InvalidArgumentError, match=needle):
            fn(image_bytes=tf.constant([png, bad]))


# ------------------------------------------------------------------ warm-up ----

def test_warmup_records_parse_and_run(exported):
    path, loaded = exported
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(os.path.join(path, warmup_file.WARMUP_FILE))]
    requests = [log.predict_log.request for log in records]
    assert [log.WhichOneof("log_type") for log in records] == ["predict_log"] * 2
    assert [(r.model_spec.name, r.model_spec.signature_name) for r in requests] == [
        ("digits", "serving_default"), ("digits", "serve_encoded")]
    inputs = [{k: tf.make_ndarray(v) for k, v in r.inputs.items()} for r in requests]
    assert inputs[0]["images"].dtype == np.float32 and inputs[0]["images"].shape == (1, 8, 8, 1)
    assert not inputs[0]["images"].any()
    assert inputs[1]["image_bytes"].shape == (1,)
    assert inputs[1]["image_bytes"][0].startswith(b"\x89PNG")
    outs = [_run(loaded.signatures[r.model_spec.signature_name], **{
        k: tf.constant(v) for k, v in i.items()}) for r, i in zip(requests, inputs)]
    for out in outs:
        assert out["probabilities"].shape == (1, 10)
    np.testing.assert_allclose(outs[0]["probabilities"], outs[1]["probabilities"], atol=1e-6)


def test_grpc_request_round_trip(trained, exported):
    """What a gRPC client sends: a PredictRequest, serialized and parsed back."""
    _, _, x = trained
    _, loaded = exported
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.model_spec.signature_name = "serve_encoded"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(_pngs(x[:3]).numpy()))
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    out = _run(loaded.signatures[parsed.model_spec.signature_name],
               image_bytes=tf.constant(tf.make_ndarray(parsed.inputs["image_bytes"])))
    want = _run(loaded.signatures["serving_default"], images=tf.constant(x[:3]))
    np.testing.assert_allclose(out["probabilities"], want["probabilities"], atol=1e-6)


# ------------------------------------------------------- REST conversions ----

SIGNATURE = {"inputs": {"images": {"dtype": "DT_FLOAT"}}}


def test_rest_row_and_columnar_inputs():
    rows = check_serving._rest_inputs({"instances": [[[1], [2]], [[3], [4]]]}, SIGNATURE)
    assert rows["images"].dtype == np.float32 and rows["images"].shape == (2, 2, 1)
    named = check_serving._rest_inputs({"instances": [{"images": [[1], [2]]}] * 2}, SIGNATURE)
    columns = check_serving._rest_inputs({"inputs": {"images": [[[1], [2]]] * 2}}, SIGNATURE)
    bare = check_serving._rest_inputs({"inputs": [[[1], [2]]] * 2}, SIGNATURE)
    for other in (named, columns, bare):
        assert other["images"].shape == (2, 2, 1)
    strings = {"inputs": {"image_bytes": {"dtype": "DT_STRING"}}}
    got = check_serving._rest_inputs(
        {"instances": [{"b64": base64.b64encode(b"\x89PNG").decode()}, "text"]}, strings)
    assert got["image_bytes"].tolist() == [b"\x89PNG", b"text"]


@pytest.mark.parametrize("body, needle", [
    ({"instances": [[1, 2], [3]]}, "same shape"),
    ({"instances": [["a"]]}, "not of expected type"),
    ({"instances": [{"b64": "AAAA"}]}, "not of expected type"),
    ({"instances": []}, "non-empty"),
    ({"instances": [[1]], "inputs": [[1]]}, "exactly one"),
    ({"instances": [{"pixels": [1]}]}, "keys"),
])
def test_rest_malformed_bodies(body, needle):
    with pytest.raises(check_serving.ServingError, match=needle):
        check_serving._rest_inputs(body, SIGNATURE)


def test_rest_outputs_in_tf_serving_shape():
    outputs = {"class_ids": np.array([3, 1]), "class_names": np.array([b"3", b"1"], object),
               "image_bytes": np.array([b"\xff", b"\x00"], object)}
    row = check_serving._rest_outputs(outputs, row=True)
    assert row == {"predictions": [
        {"class_ids": 3, "class_names": "3", "image_bytes": {"b64": "/w=="}},
        {"class_ids": 1, "class_names": "1", "image_bytes": {"b64": "AA=="}}]}
    columnar = check_serving._rest_outputs({"class_ids": np.array([3, 1])}, row=False)
    assert columnar == {"outputs": [3, 1]}


# -------------------------------------------------------- check_serving.py ----

@pytest.mark.slow
def test_check_serving_passes_a_good_export(exported):
    path, _ = exported
    proc = subprocess.run([sys.executable, CHECK_SERVING, path], env=ENV, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = proc.stdout
    for needle in ("MetaGraphDef with tag-set: 'serve'", "signature_def['serve_encoded']",
                   "inputs['images'] tensor_info:", "shape: (-1, 8, 8, 1)",
                   "Method name is: tensorflow/serving/predict"):
        assert needle in out
    checks = out[out.index("Checks:"):].splitlines()[1:-1]
    assert checks and all(line.startswith("PASS  ") for line in checks), checks
    for needle in ("server process: TF1 session loader", "gRPC PredictRequest serve_encoded",
                   "REST row serve_encoded (instances of b64 JPEG)", "REST columnar",
                   "refuses serve_encoded with a truncated JPEG", "warm-up records run",
                   *CROSS_CHECKS):
        assert any(needle in line for line in checks), needle
    assert out.strip().splitlines()[-1] == f"all {len(checks)} checks passed"


def _fake_export(path, signatures=("serving_default", "serve_encoded"), flip=False):
    """A non-Keras SavedModel with the contract's signatures; with `flip`, serve_encoded
    mirrors the images first (a tampered export)."""
    weights = tf.constant(np.random.default_rng(1).normal(size=[64, 10]) / 50, tf.float32)
    names = tf.constant([str(i) for i in range(10)])

    def outputs(images):
        logits = tf.reshape(images, [-1, 64]) @ weights
        ids = tf.argmax(logits, axis=-1)
        return {"probabilities": tf.nn.softmax(logits), "class_ids": ids,
                "class_names": tf.gather(names, ids)}

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="images")])
    def serving_default(images):
        return outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_encoded(image_bytes):
        images = tf.map_fn(lambda b: tf.reshape(data.decode_image(b, 1), [8, 8, 1]),
                           image_bytes, fn_output_signature=tf.TensorSpec([8, 8, 1]))
        return outputs(tf.image.flip_left_right(images) if flip else images)

    functions = {"serving_default": serving_default, "serve_encoded": serve_encoded}
    tf.saved_model.save(tf.Module(), str(path),
                        signatures={k: functions[k] for k in signatures})
    warmup_file.write_warmup_requests(str(path), "fake", (8, 8, 1))
    return str(path)


def _check(path):
    lines = []
    failed = check(path, out=lines.append)
    return failed, [line for line in lines if line.startswith(("PASS  ", "FAIL  "))]


@pytest.mark.slow
def test_check_serving_fails_a_tampered_serve_encoded(tmp_path):
    failed, checks = _check(_fake_export(tmp_path / "fake" / "1", flip=True))
    failing = [line.split(":")[0] for line in checks if line.startswith("FAIL")]
    # Only the comparison of the two signatures sees the mirroring: the server answers
    # exactly what the in-memory model answers. And this model has no shape checks in
    # its graph, so it answers some malformed requests (reshape(-1, 64) turns one
    # 2-channel image into two rows): under TF Serving those would be wrong answers.
    assert failing == [
        "FAIL  serve_encoded(PNG) = serving_default(same pixels), in memory, 8x8x1",
        "FAIL  serve_encoded(JPEG) = serving_default(decoded JPEG pixels), in memory",
        "FAIL  refuses serving_default with a wrong channel count",
        "FAIL  refuses serving_default without the channel axis (wrong rank)"], checks
    assert failed == 4
    assert any(line.startswith("PASS  server process") for line in checks)
    assert any(line.startswith("PASS  REST row serve_encoded") for line in checks)


def test_check_serving_fails_a_missing_signature(tmp_path):
    failed, checks = _check(_fake_export(tmp_path / "1", signatures=["serving_default"]))
    assert failed >= 1
    assert any(line.startswith("FAIL  signature serve_encoded: missing") for line in checks)


def _model_dir(root):
    """A model base path passed for a version directory: versions 1 and 3 (and a 0
    and a non-version, which TF Serving never loads)."""
    for name in ("1", "3", "0", "x"):
        (root / name).mkdir()
    return root


@pytest.mark.parametrize("make, needle", [
    (lambda root: root / "missing", "EXPORT_DIR: not a directory"),
    (lambda root: root, "EXPORT_DIR: not a SavedModel directory"),
    (_model_dir, "it holds versions [1, 3]: pass a version directory such as "),
])
def test_check_serving_bad_export_dir_exits_2(tmp_path, make, needle):
    proc = subprocess.run([sys.executable, CHECK_SERVING, str(make(tmp_path))], env=ENV,
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and needle in proc.stderr
    assert proc.stderr.startswith("kgreedy: error: ")


# ------------------------------------------------------------ kgreedy.predict ----

@pytest.fixture(scope="module")
def images(trained, tmp_path_factory):
    """Two digits as PNG and JPEG files, and bad files."""
    _, _, x = trained
    root = tmp_path_factory.mktemp("images")
    files = {"a.png": tf.io.encode_png(tf.cast(x[0], tf.uint8)).numpy(),
             "b.jpg": tf.io.encode_jpeg(tf.cast(x[1] * 15, tf.uint8)).numpy(),
             "text.png": b"not an image"}
    files["cut.jpg"] = files["b.jpg"][:len(files["b.jpg"]) // 2]
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def test_predict_json_matches_the_model(trained, exported, images, capsys):
    _, _, x = trained
    path, loaded = exported
    files = [str(images / "a.png")]
    assert cli.run(predict.main, [os.path.dirname(path), *files, "--json", "--top-k",
                                  "3"]) == 0
    results = json.loads(capsys.readouterr().out)
    want = _run(loaded.signatures["serving_default"], images=tf.constant(x[:1]))
    assert [r["file"] for r in results] == files
    predictions = results[0]["predictions"]
    assert len(predictions) == 3
    assert predictions[0]["class_id"] == want["class_ids"][0]
    assert predictions[0]["class_name"] == want["class_names"][0].decode()
    top3 = np.argsort(-want["probabilities"][0])[:3]
    assert [p["class_id"] for p in predictions] == top3.tolist()
    np.testing.assert_allclose([p["probability"] for p in predictions],
                               want["probabilities"][0][top3], atol=1e-6)


@pytest.mark.slow
def test_predict_bad_files_get_one_line_each(exported, images):
    path, _ = exported
    files = [images / name for name in ("a.png", "missing.png", "text.png", "b.jpg",
                                        "cut.jpg")]
    proc = subprocess.run([sys.executable, "-m", "kgreedy.predict", path,
                           *map(str, files), "--top-k", "2"],
                          env=ENV, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    out = proc.stdout.splitlines()
    assert out[0] == str(files[0]) and out[3] == str(files[3]) and len(out) == 6
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kgreedy:")]
    assert errors == [
        f"kgreedy: error: {files[1]}: cannot read: No such file or directory",
        f"kgreedy: error: {files[2]}: not an image this model can read: Unknown image file "
        "format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required.",
        f"kgreedy: error: {files[4]}: not an image this model can read: jpeg::Uncompress "
        "failed. Invalid JPEG data or crop window."]


@pytest.mark.parametrize("argv, needle", [
    (["{missing}", "x.png"], "EXPORT_DIR: not an exported model"),
    (["{export}", "x.png", "--top-k", "0"], "--top-k: must be a positive integer"),
    (["{export}"], "IMAGE"),
])
def test_predict_bad_usage_exits_2(exported, tmp_path, capsys, argv, needle):
    path, _ = exported
    argv = [a.format(missing=tmp_path / "nothing", export=path) for a in argv]
    with pytest.raises(SystemExit) as info:
        cli.run(predict.main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kgreedy: error:") and needle in err

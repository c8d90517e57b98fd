"""The SavedModel's files, tag-set and signatures, against the serving contract.

TF Serving finds a model by its layout (MODEL_BASE/VERSION with a positive integer
VERSION and the variables beside `saved_model.pb`), loads the MetaGraphDef tagged
exactly `serve`, and answers by the SignatureDefs' names, input and output keys and
method name. Clients are written against the contract in docs/serving.md ("The
export and its signatures"): `serving_default` (`images` float32 [batch, H, W, C])
and `serve_encoded` (`image_bytes` string [batch]), both returning `probabilities`,
`class_ids` and `class_names` by `tensorflow/serving/predict`. A mismatch there breaks
every client at once, so these checks read the proto itself rather than what
`tf.saved_model.load` makes of it.

`read_saved_model` checks the directory before TensorFlow is imported, so that a
mistyped path gives one error line and not TensorFlow's start-up chatter as well.
"""

import os

from kgreedy.base.errors import KgreedyError
from kgreedy.serving.versions import existing_versions
from kgreedy.serving.tf_server import dtype_name

SIGNATURES = ("serving_default", "serve_encoded")
INPUTS = {"serving_default": "images", "serve_encoded": "image_bytes"}
OUTPUTS = {"probabilities": "DT_FLOAT", "class_ids": "DT_INT64", "class_names": "DT_STRING"}
# An early-exit export's signatures add the head each answer came from (1-based).
EXIT_OUTPUTS = {"exit_stage": "DT_INT64"}
# ... and its version holds the thresholds and their figures (`plan_exits`) here.
EXIT_PLAN_FILE = os.path.join("assets.extra", "early_exit.json")
PREDICT_METHOD = "tensorflow/serving/predict"
_FILES = ("saved_model.pb", "saved_model.pbtxt")


# ---------------------------------------------------------------- the files ----

def _check_export_dir(export_dir):
    """Raises KgreedyError unless `export_dir` holds a SavedModel file."""
    if not os.path.isdir(export_dir):
        raise KgreedyError("export_dir", "not a directory", export_dir)
    if not any(os.path.isfile(os.path.join(export_dir, name)) for name in _FILES):
        # The commonest slip is passing the model directory, one level too high.
        versions = existing_versions(export_dir)
        hint = (f"; it holds versions {versions}: pass a version directory such as "
                f"{os.path.join(export_dir, str(versions[-1]))}" if versions else "")
        raise KgreedyError("export_dir", f"not a SavedModel directory (no saved_model.pb)"
                           f"{hint}", export_dir)


def read_saved_model(export_dir):
    """The SavedModel proto of the version directory `export_dir`.

    Raises:
        KgreedyError: about `export_dir`, when it holds no SavedModel or one that cannot
            be parsed.
    """
    _check_export_dir(export_dir)
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    pb, pbtxt = (os.path.join(export_dir, name) for name in _FILES)
    saved_model = saved_model_pb2.SavedModel()
    try:
        if os.path.isfile(pb):
            with open(pb, "rb") as f:
                saved_model.ParseFromString(f.read())
        else:
            with open(pbtxt, encoding="utf-8") as f:
                text_format.Parse(f.read(), saved_model)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as e:
        raise KgreedyError("export_dir", f"the SavedModel file cannot be parsed ({e})",
                           export_dir) from None
    return saved_model


def layout_problems(export_dir):
    """What in the version directory's layout TF Serving would not load (empty if none)."""
    version = os.path.basename(export_dir)
    problems = []
    if not (version.isascii() and version.isdigit() and int(version) > 0):
        problems.append(f"the directory name {version!r} is not a positive integer version")
    if not os.path.isfile(os.path.join(export_dir, "variables", "variables.index")):
        problems.append("variables/variables.index is missing")
    return problems


# ----------------------------------------------------------- the listing ----

def _shape_of(tensor_info):
    if tensor_info.tensor_shape.unknown_rank:
        return None
    return [d.size for d in tensor_info.tensor_shape.dim]


def format_shape(shape):
    """A shape list as `saved_model_cli` prints it, e.g. `(-1, 8, 8, 1)`."""
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
                              f"        dtype: {dtype_name(info.dtype)}",
                              f"        shape: {format_shape(_shape_of(info))}",
                              f"        name: {info.name}"]
            lines.append(f"  Method name is: {signature.method_name}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------- the contract ----

def serve_meta_graphs(saved_model):
    """The MetaGraphDefs tagged exactly `serve`: the one TF Serving loads comes first."""
    return [m for m in saved_model.meta_graphs if set(m.meta_info_def.tags) == {"serve"}]


def signature_specs(meta_graph):
    """{signature: {"inputs"/"outputs": {name: {"dtype", "shape"}}}} of a MetaGraphDef."""
    return {key: {kind: {name: {"dtype": dtype_name(info.dtype), "shape": _shape_of(info)}
                         for name, info in getattr(signature, kind).items()}
                  for kind in ("inputs", "outputs")}
            for key, signature in meta_graph.signature_def.items()}


def declared_classes(specs):
    """The class count `serving_default`'s probabilities declare; -1 when unknown."""
    shape = (specs.get("serving_default", {}).get("outputs", {})
             .get("probabilities", {}).get("shape") or [-1, -1])
    return shape[-1] if len(shape) == 2 else -1


def _input_problems(name, inputs):
    want_input = INPUTS[name]
    if list(inputs) != [want_input]:
        return [f"inputs are {sorted(inputs)}, expected ['{want_input}']"]
    dtype, shape = inputs[want_input]["dtype"], inputs[want_input]["shape"]
    if name == "serving_default":
        # H and W are both known (the model's size) or both -1 (the model resizes).
        ok = (dtype == "DT_FLOAT" and shape is not None and len(shape) == 4
              and shape[0] == -1 and shape[3] > 0 and (shape[1] == -1) == (shape[2] == -1))
        want = "DT_FLOAT (-1, H, W, C) with C known"
    else:
        ok = dtype == "DT_STRING" and shape == [-1]
        want = "DT_STRING (-1)"
    if ok:
        return []
    return [f"input {want_input} is {dtype} {format_shape(shape)}, expected {want}"]


def _output_problems(outputs, num_classes):
    expected = {**OUTPUTS, **(EXIT_OUTPUTS if "exit_stage" in outputs else {})}
    if set(outputs) != set(expected):
        return [f"outputs are {sorted(outputs)}, expected {sorted(OUTPUTS)}, and "
                "exit_stage in an early-exit export"]
    problems = []
    for key, dtype in expected.items():
        shape = outputs[key]["shape"]
        want_shape = [-1, num_classes] if key == "probabilities" else [-1]
        if outputs[key]["dtype"] != dtype or shape != want_shape:
            problems.append(f"output {key} is {outputs[key]['dtype']} "
                            f"{format_shape(shape)}, expected {dtype} "
                            f"{format_shape(want_shape)}")
    return problems


def contract_problems(name, signature, method_name, num_classes):
    """What in one signature departs from the contract (empty when nothing).

    Args:
        name: one of SIGNATURES.
        signature: its entry of `signature_specs`.
        method_name: its SignatureDef's method name.
        num_classes: the class count the probabilities must have (`declared_classes`).
    """
    problems = (_input_problems(name, signature["inputs"])
                + _output_problems(signature["outputs"], num_classes))
    if method_name != PREDICT_METHOD:
        problems.append(f"method name is {method_name!r}, expected {PREDICT_METHOD!r}")
    return problems

"""Recipes: strict JSON loading into frozen dataclasses, `--set` overrides, validation.

A recipe is one JSON object. Every key is declared below with its type, default and
allowed range; an unknown key, a wrong type or a value out of range raises
`RecipeError` naming the JSON path (`model.blocks[2].downsample`) and the received
value, before anything is written to disk.
"""

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field

from kgreedy import architectures
from kgreedy.errors import KgreedyError, RecipeError

SOURCES = ("digits", "tfds", "image_folder")
AUGMENTS = ("none", "cifar", "imagenet")
DOWNSAMPLES = ("none", "psi", "maxpool", "avgpool", "stride")
OPTIMIZERS = ("sgd", "adamw")
WEIGHT_DECAY_TYPES = ("l2", "decoupled")
SCHEDULES = ("constant", "step", "cosine")
MODES = ("greedy", "end_to_end")
CACHE_MODES = ("auto", "on", "off")
IMAGE_CACHES = ("auto", "memory", "disk", "none")
BAD_FILES = ("skip", "error")
PRECISIONS = ("none", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
ARCHITECTURE_NAMES = tuple(architectures.ARCHITECTURES)
EXPORT_HEADS = ("last", "ensemble")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _key(default=dataclasses.MISSING, *, choices=None, low=None, high=None,
         open_low=False, open_high=False, pattern=None, doc=""):
    """Declares a recipe key with its default and allowed values."""
    meta = dict(choices=choices, low=low, high=high, open_low=open_low,
                open_high=open_high, pattern=pattern, doc=doc)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are augmented (`data.*`)."""

    source: str = _key("digits", choices=SOURCES,
                       doc="where images come from; digits is embedded (scikit-learn)")
    name: typing.Optional[str] = _key(None, doc="TFDS dataset name, e.g. cifar10")
    data_dir: typing.Optional[str] = _key(
        None, doc="TFDS data_dir, or the image_folder root (train/ with eval/, val/, "
                  "validation/ or test/; or train/ alone; or class folders directly)")
    train_split: typing.Optional[str] = _key(
        None, doc="TFDS split, or image_folder folder, to train on (default: train)")
    eval_split: typing.Optional[str] = _key(
        None, doc="TFDS split to evaluate on (default: test), or image_folder folder "
                  "(default: whichever of eval, val, validation, test is present)")
    eval_fraction: float = _key(0.2, low=0.0, high=1.0, open_low=True, open_high=True,
                                doc="digits, and image folders without an eval folder: "
                                    "stratified, seeded held-out fraction")
    image_size: typing.Optional[int] = _key(
        None, low=1, doc="side of the square model input; default: the dataset's own")
    channels: typing.Optional[int] = _key(
        None, choices=(1, 3), doc="image channels; default: the dataset's own (3 for folders)")
    augment: str = _key("none", choices=AUGMENTS, doc="training augmentation")
    eval_crop_fraction: float = _key(0.875, low=0.0, high=1.0, open_low=True,
                                     doc="imagenet augment: eval centre crop / resize side")
    mean: typing.Optional[typing.Tuple[float, ...]] = _key(
        None, doc="per-channel mean on the raw scale; default: measured on train data")
    std: typing.Optional[typing.Tuple[float, ...]] = _key(
        None, doc="per-channel std on the raw scale; default: measured on train data")
    shuffle_buffer: int = _key(10000, low=1, doc="tfds: tf.data shuffle buffer (examples); "
                                                 "digits and image folders shuffle all "
                                                 "example indices every epoch instead")
    cache: str = _key("auto", choices=IMAGE_CACHES,
                      doc="image_folder: keep decoded, resized images for the run; auto: "
                          "in memory up to data.cache_memory_mb, else on disk in the run "
                          "directory (cache/images, removed at the end); none: decode "
                          "every epoch")
    cache_memory_mb: int = _key(2048, low=1, doc="image_folder: the in-memory limit of "
                                                 "data.cache auto")
    bad_files: str = _key("skip", choices=BAD_FILES,
                          doc="image_folder: a file that cannot be decoded is left out "
                              "(counted and named in the log and summary.json), or "
                              "stops the run naming it (error)")
    download: bool = _key(False, doc="tfds: download and prepare when missing")


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """One trunk block (`model.blocks[i]`): [downsample] -> conv3x3 -> [BN] -> ReLU."""

    width: int = _key(low=1, doc="output channels of the block's conv")
    downsample: str = _key("none", choices=DOWNSAMPLES, doc="downsampling before the conv")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The trunk (`model.*`)."""

    architecture: typing.Optional[str] = _key(
        None, choices=ARCHITECTURE_NAMES,
        doc="a named model of kgreedy/architectures.py (paper_cifar10 and paper_imagenet "
            "pick their k=1 or k>=2 variant by aux.k); fills model.blocks and the model's "
            "defaults of the keys below and of aux.*")
    blocks: typing.Tuple[BlockConfig, ...] = _key(
        (), doc="the trunk, one block per stage (required without model.architecture)")
    batch_norm: bool = _key(True, doc="BN after every conv (blocks and heads)")
    conv_bias: bool = _key(False, doc="trunk convs keep a bias even before BN "
                                      "(torchvision's VGG does; vgg11 sets it)")
    sync_batch_norm: bool = _key(
        False, doc="BN batch statistics over all replicas (several devices/workers)")


HEAD_TYPES = ("conv", "mlp_sr", "linear", "vgg")


@dataclass(frozen=True, kw_only=True)
class AuxStageConfig:
    """One stage's auxiliary design (`aux.per_stage[i]`, stage i+1); null keeps aux.*."""

    head: typing.Optional[str] = _key(None, choices=HEAD_TYPES, doc="this stage's head type")
    k: typing.Optional[int] = _key(None, low=1, doc="this stage's k")
    width: typing.Optional[int] = _key(
        None, low=1, doc="this stage's head width, as is (not doubled at downsamplings)")
    pool_size: typing.Optional[int] = _key(None, low=1, doc="this stage's pool_size")


@dataclass(frozen=True, kw_only=True)
class AuxConfig:
    """The auxiliary problem (`aux.*`), DESIGN.md section 1."""

    head: str = _key("conv", choices=HEAD_TYPES,
                     doc="conv: the paper's (k-1 conv3x3, pool, BN, linear); mlp_sr: "
                         "Decoupled Greedy Learning's MLP-SR (pool to side/4, k-1 conv1x1, "
                         "pool, 3 hidden dense layers, linear); linear: pool and one linear "
                         "layer (k, width unused); vgg: VGG's classifier (max-pool, "
                         "FC-4096, FC-4096, linear, dropout 0.5)")
    k: int = _key(2, low=1, doc="hidden layers of the auxiliary problem, block included")
    width: int = _key(128, low=1, doc="width of the head's k-1 conv layers at block 1")
    grow_with_downsample: bool = _key(
        True, doc="double the head width at every downsampling after block 1, as the "
                  "official code does")
    pool_size: int = _key(2, low=1, doc="the head averages the map to pool_size x pool_size")
    reduction: typing.Optional[int] = _key(
        None, low=1, doc="conv and mlp_sr heads first average the map to 1/reduction of "
                         "its side (default: conv 1, i.e. not at all; mlp_sr 4)")
    last_head: typing.Optional[str] = _key(
        None, choices=HEAD_TYPES, doc="head type of the last stage, the deployed "
                                      "classifier (default: aux.head); vgg: VGG's FC-4096 x2")
    last_width: typing.Optional[int] = _key(
        None, low=1, doc="width of the last stage's head, the paper's M~_f (default: "
                         "aux.width grown as the other stages')")
    per_stage: typing.Tuple[AuxStageConfig, ...] = _key(
        (), doc="optional per-stage designs (default: none, every stage uses the keys "
                "above); item i overrides them for stage i+1 (what a per_stage search "
                "writes)")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """A fresh optimizer is built from this at every stage (`train.optimizer.*`)."""

    name: str = _key("sgd", choices=OPTIMIZERS, doc="a new one at every stage")
    learning_rate: float = _key(0.1, low=0.0, open_low=True,
                                doc="initial rate of every stage")
    momentum: float = _key(0.9, low=0.0, high=1.0, open_high=True, doc="sgd only")
    nesterov: bool = _key(False, doc="sgd only")
    beta_1: float = _key(0.9, low=0.0, high=1.0, open_high=True, doc="adamw only")
    beta_2: float = _key(0.999, low=0.0, high=1.0, open_high=True, doc="adamw only")
    weight_decay: float = _key(5e-4, low=0.0, doc="see weight_decay_type")
    weight_decay_type: str = _key(
        "l2", choices=WEIGHT_DECAY_TYPES,
        doc="l2: added to the gradient before momentum (PyTorch, the paper); "
            "decoupled: w -= lr*wd*w (Keras, AdamW)")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Per-stage learning-rate schedule (`train.lr_schedule.*`)."""

    name: str = _key("step", choices=SCHEDULES, doc="restarts at every stage")
    decay_every_epochs: int = _key(15, low=1, doc="step: epochs between decays")
    decay_factor: float = _key(0.2, low=0.0, high=1.0, open_low=True, doc="step: multiplier")
    warmup_epochs: int = _key(0, low=0, doc="linear warm-up at the start of each stage")
    final_fraction: float = _key(0.0, low=0.0, high=1.0, doc="cosine: final lr / initial lr")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop (`train.*`)."""

    mode: str = _key("greedy", choices=MODES,
                     doc="greedy: stage by stage; end_to_end: the deployed network "
                         "(all blocks + last head) trained jointly, as a baseline")
    epochs_per_stage: int = _key(10, low=1, doc="epochs of each stage (end_to_end: in all)")
    batch_size: int = _key(128, low=1, doc="global batch size")
    eval_batch_size: typing.Optional[int] = _key(None, low=1, doc="default: batch_size")
    steps_per_epoch: typing.Optional[int] = _key(
        None, low=1, doc="cap on steps per epoch (default: one pass over the train split)")
    steps_per_execution: int = _key(
        8, low=1, doc="train steps run per tf.function call (fewer host round trips)")
    checkpoint_every_steps: typing.Optional[int] = _key(
        None, low=1, doc="also checkpoint mid-epoch every N steps (default: per epoch)")
    deterministic: bool = _key(
        False, doc="op determinism: a resumed run ends bitwise equal to an unbroken one")
    cache_features: str = _key(
        "auto", choices=CACHE_MODES,
        doc="run the frozen blocks once per stage and train on their cached output; "
            "auto: when data.augment is none (greedy mode, one worker) and the frozen "
            "blocks cost enough FLOPs per cached byte (kgreedy/cache.py)")
    cache_memory_mb: int = _key(
        1024, low=0, doc="cached features up to this size stay in memory, else on disk "
                         "in the run directory (removed after the stage)")
    mixed_precision: str = _key(
        "none", choices=PRECISIONS,
        doc="Keras mixed-precision policy; mixed_float16 adds dynamic loss scaling")
    jit_compile: bool = _key(False, doc="XLA-compile the forward and backward pass")
    optimizer: OptimizerConfig = _key(OptimizerConfig())
    lr_schedule: ScheduleConfig = _key(ScheduleConfig())


@dataclass(frozen=True, kw_only=True)
class DistributeConfig:
    """The tf.distribute strategy (`distribute.*`)."""

    strategy: str = _key("auto", choices=STRATEGIES,
                         doc="auto: mirrored over several local GPUs, else default")
    devices: typing.Optional[typing.Tuple[str, ...]] = _key(
        None, doc="mirrored only: device names, e.g. [\"/gpu:0\", \"/gpu:1\"]")
    logical_cpus: int = _key(
        1, low=1, doc="split the CPU into N logical devices (mirrored without GPUs)")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """The SavedModel written after training (`export.*`)."""

    enabled: bool = _key(True, doc="export after training")
    model_name: typing.Optional[str] = _key(None, pattern=_NAME_RE,
                                            doc="default: the recipe name")
    version: typing.Optional[int] = _key(None, low=1, doc="default: next free version")
    keep_versions: typing.Optional[int] = _key(
        None, low=1, doc="after exporting, delete all but the newest N versions "
                         "(default: keep all)")
    heads: str = _key("last", choices=EXPORT_HEADS,
                      doc="last: trunk + last head; ensemble: trunk + every head, logits "
                          "averaged with weights 2^j (the paper's Z = sum_j 2^j z_j, "
                          "normalised); greedy runs only")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A whole recipe. Build with `load_recipe` or `recipe_from_dict`."""

    name: str = _key(pattern=_NAME_RE, doc="run name; also the default export model name")
    description: str = _key("", doc="free text: what the recipe reproduces, assumptions")
    seed: int = _key(0, low=0, doc="seeds weights, the digits split and the shuffle order")
    data: DataConfig = _key(DataConfig())
    model: ModelConfig = _key(doc="the trunk")
    aux: AuxConfig = _key(AuxConfig())
    train: TrainConfig = _key(TrainConfig())
    distribute: DistributeConfig = _key(DistributeConfig())
    export: ExportConfig = _key(ExportConfig())

    @property
    def model_name(self):
        return self.export.model_name or self.name

    def to_dict(self):
        """Plain JSON-ready dict; `recipe_from_dict(r.to_dict()) == r`."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def _type_name(tp):
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number",
                "bool": "true or false"}.get(tp.__name__, f"an object ({tp.__name__})")
    return str(tp)


def _convert(tp, value, path):
    """Converts a JSON value to the declared type `tp`, or raises RecipeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise RecipeError(path, "expected a list", value)
        return tuple(_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(path, "expected an object", value)
        return _build(tp, value, path)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise RecipeError(path, f"expected {_type_name(tp)}", value)
    return value


def _check_range(meta, value, path):
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise RecipeError(path, f"must be one of {allowed}", value)
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta["open_low"] and value == low)):
        raise RecipeError(path, f"must be {'>' if meta['open_low'] else '>='} {low}", value)
    if high is not None and (value > high or (meta["open_high"] and value == high)):
        raise RecipeError(path, f"must be {'<' if meta['open_high'] else '<='} {high}", value)
    if meta.get("pattern") is not None and not meta["pattern"].match(value):
        raise RecipeError(path, "must be letters, digits, '_', '.' or '-' "
                          "and start with a letter or digit", value)


def _build(cls, raw, path):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise RecipeError(_join(path, key), "unknown key; known keys are "
                              + ", ".join(known), raw[key])
    kwargs = {}
    for name, f in known.items():
        key_path = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(key_path, "is required")
            continue
        value = _convert(hints[name], raw[name], key_path)
        _check_range(f.metadata, value, key_path)
        kwargs[name] = value
    return cls(**kwargs)


def _validate(recipe):
    """Checks that span several keys."""
    if not recipe.model.blocks:
        raise RecipeError("model.blocks", "needs at least one block (or set "
                          "model.architecture)", [])
    data = recipe.data
    if data.source == "tfds" and not data.name:
        raise RecipeError("data.name", "is required when data.source is 'tfds'", data.name)
    if data.source == "image_folder":
        if not data.data_dir:
            raise RecipeError("data.data_dir", "is required when data.source is "
                              "'image_folder' (the folder of class folders, or of train/ and val/)", None)
        if data.image_size is None:
            raise RecipeError("data.image_size", "is required when data.source is "
                              "'image_folder' (images are resized to it)", None)
    for key in ("mean", "std"):
        stats = getattr(data, key)
        if stats is not None and len(stats) not in (1, data.channels or len(stats)):
            raise RecipeError(f"data.{key}", "needs one value per channel", list(stats))
    if data.std is not None and any(s <= 0 for s in data.std):
        raise RecipeError("data.std", "values must be > 0", list(data.std))
    if data.augment == "imagenet" and data.image_size is None:
        raise RecipeError("data.image_size", "is required with data.augment 'imagenet'", None)
    if len(recipe.aux.per_stage) > len(recipe.model.blocks):
        raise RecipeError("aux.per_stage", f"has more entries than the "
                          f"{len(recipe.model.blocks)} stages of model.blocks",
                          len(recipe.aux.per_stage))
    if recipe.train.cache_features == "on" and recipe.data.augment != "none":
        raise RecipeError("train.cache_features", "'on' needs data.augment 'none': cached "
                          f"features cannot be augmented (data.augment is "
                          f"{recipe.data.augment!r}); use 'auto' or 'off'", "on")
    if recipe.train.cache_features == "on" and recipe.train.mode == "end_to_end":
        raise RecipeError("train.cache_features", "'on' does not apply to train.mode "
                          "'end_to_end' (every block trains)", "on")
    if recipe.distribute.logical_cpus > 1 and recipe.distribute.strategy not in ("auto",
                                                                               "mirrored"):
        raise RecipeError("distribute.logical_cpus", "only applies to strategies 'auto' and "
                          f"'mirrored', not {recipe.distribute.strategy!r}",
                          recipe.distribute.logical_cpus)
    if recipe.export.heads == "ensemble" and recipe.train.mode == "end_to_end":
        raise RecipeError("export.heads", "'ensemble' needs train.mode 'greedy': an "
                          "end-to-end run trains only the last head", "ensemble")
    if recipe.distribute.devices is not None and recipe.distribute.strategy != "mirrored":
        raise RecipeError("distribute.devices", "only applies to strategy 'mirrored'",
                          list(recipe.distribute.devices))


def recipe_from_dict(raw):
    """Builds and validates a `Recipe` from a parsed JSON object."""
    if not isinstance(raw, dict):
        raise RecipeError("", "a recipe must be a JSON object", raw)
    model = raw.get("model")
    if isinstance(model, dict) and model.get("architecture") is not None:
        raw = architectures.expand(json.loads(json.dumps(raw)))
    recipe = _build(Recipe, raw, "")
    _validate(recipe)
    return recipe


def parse_override(text):
    """Splits `KEY=VALUE`; the value is parsed as JSON, else taken as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KgreedyError("--set", "expected KEY=VALUE with a dotted KEY", text)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key, value


def apply_overrides(raw, overrides):
    """Returns a copy of `raw` with each `KEY=VALUE` in `overrides` applied.

    KEY is a dotted path; list items are addressed by index (`model.blocks.0.width`).
    Missing objects along the path are created, so a key the recipe left at its
    default can be set; unknown keys are caught by validation afterwards.
    """
    raw = json.loads(json.dumps(raw))
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise KgreedyError("--set", f"{where}: no list item {part!r} "
                                       f"(the list has {len(node)} items)", text)
                part = int(part)
            elif not isinstance(node, dict):
                raise KgreedyError("--set", f"{where}: cannot descend into a "
                                   f"{type(node).__name__}", text)
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return raw


def load_recipe(path, overrides=()):
    """Reads a recipe file, applies `--set` overrides, and validates it.

    Args:
        path: a JSON recipe file.
        overrides: `KEY=VALUE` strings, applied in order.

    Returns:
        A frozen `Recipe`.

    Raises:
        KgreedyError: the file is missing or not JSON, or an override is malformed.
        RecipeError: a key is unknown, of the wrong type or out of range.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise KgreedyError(str(path), "recipe file not found") from None
    except IsADirectoryError:
        raise KgreedyError(str(path), "recipe path is a directory, not a JSON file") from None
    except json.JSONDecodeError as e:
        raise KgreedyError(str(path), f"not valid JSON: {e.msg} at line {e.lineno} "
                           f"column {e.colno}") from None
    return recipe_from_dict(apply_overrides(raw, overrides))


def check_against_data(recipe, image_size, num_replicas=1):
    """Checks what needs the data's image size and the replica count.

    Args:
        recipe: a validated `Recipe`.
        image_size: the side of the model input.
        num_replicas: replicas of the distribution strategy.

    Raises:
        RecipeError: the image is too small for the downsamplings and the head's
            pooling, or the global batch does not split over the replicas.
    """
    size, sides = image_size, []
    for i, block in enumerate(recipe.model.blocks):
        if block.downsample != "none":
            if size < 2 or (block.downsample == "psi" and size % 2):
                raise RecipeError(
                    f"model.blocks[{i}].downsample",
                    f"the feature map is {size}x{size} before this block, too small for "
                    f"another downsampling (image_size {image_size}, "
                    f"{sum(b.downsample != 'none' for b in recipe.model.blocks)} "
                    "downsamplings)", block.downsample)
            size //= 2
        own = recipe.aux.per_stage[i] if i < len(recipe.aux.per_stage) else None
        if own is not None and own.pool_size is not None and size < own.pool_size:
            raise RecipeError(
                f"aux.per_stage[{i}].pool_size",
                f"the feature map after block {i + 1} is {size}x{size}, smaller than "
                "this pool size", own.pool_size)
        if size < recipe.aux.pool_size and (own is None or own.pool_size is None):
            raise RecipeError(
                f"model.blocks[{i}].downsample",
                f"the feature map is {size}x{size} after this block, smaller than "
                f"aux.pool_size {recipe.aux.pool_size}: image_size {image_size} is too "
                "small for the number of downsamplings", block.downsample)
        sides.append(size)
    from kgreedy.network import head_designs  # network -> layers -> recipe: import late

    last = len(sides) - 1
    for i, design in enumerate(head_designs(recipe)):
        if design["kind"] == "vgg" and sides[i] < 2:
            key = ("aux.last_head" if i == last and recipe.aux.last_head == "vgg" else
                   f"aux.per_stage[{i}].head" if i < len(recipe.aux.per_stage)
                   and recipe.aux.per_stage[i].head == "vgg" else "aux.head")
            raise RecipeError(key, f"the vgg head of stage {i + 1} max-pools a "
                              f"{sides[i]}x{sides[i]} map, which needs at least 2x2 "
                              f"(image_size {image_size})", "vgg")
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(recipe.train, key)
        if value is not None and value % num_replicas:
            raise RecipeError(f"train.{key}", f"must be divisible by the {num_replicas} "
                              "replicas of the distribution strategy", value)


def describe_keys(cls=Recipe, prefix=""):
    """Yields (path, type, default, doc) for every key, for the README reference."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            yield from describe_keys(tp, path)
            continue
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            default = ("required" if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING else "[]")
            yield (path, "list of objects", default, f.metadata.get("doc", ""))
            yield from describe_keys(typing.get_args(tp)[0], path + "[]")
            continue
        default = "required" if f.default is dataclasses.MISSING else json.dumps(f.default)
        choices = f.metadata.get("choices")
        doc = f.metadata.get("doc", "")
        if choices:
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, choices))
        yield (path, _json_type(tp), default, doc)


def _json_type(tp):
    """A type as a JSON user reads it: `integer or null`, `list of numbers`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_json_type(args[0])} or null"
    if origin is tuple:
        item = _json_type(typing.get_args(tp)[0])
        return "list of " + {"integer": "integers", "number": "numbers",
                             "string": "strings"}.get(item, item)
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))

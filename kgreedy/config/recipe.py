"""The training recipe: its schema, `--set` overrides, and the checks across keys.

A recipe is one JSON object. Every key is declared below with its type, default and
allowed range (`kgreedy.config.schema`); an unknown key, a wrong type or a value out
of range raises `RecipeError` naming the JSON path (`model.blocks[2].downsample`) and
the received value, before anything is written to disk.
"""

import dataclasses
import json
import typing
from dataclasses import dataclass

from kgreedy.base.errors import RecipeError
from kgreedy.base.machine import is_budget
from kgreedy.base.files import read_json
from kgreedy.config import architectures
from kgreedy.config.model_checks import split_source, validate_model, validate_objective
from kgreedy.config.overrides import apply_overrides
from kgreedy.config.schema import build, setting, to_plain
from kgreedy.config.vocabulary import (AUGMENTS, BAD_FILES, CACHE_MODES, DOWNSAMPLES,
                                       EXPORT_HEADS, HEAD_TYPES, IMAGE_CACHES,
                                       LAST_HEAD_TYPES, LOCAL_OBJECTIVES, MODES,
                                       NAME_RE, OPTIMIZERS,
                                       PRECISIONS, SCHEDULES, SOURCES, STRATEGIES,
                                       WEIGHT_DECAY_TYPES)

ARCHITECTURE_NAMES = tuple(architectures.ARCHITECTURES) + tuple(architectures.RESIDUAL)
SEED_MAX = 2**32 - 1  # keras.utils.set_random_seed (NumPy's seed) takes no more


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are augmented (`data.*`)."""

    source: str = setting("digits", choices=SOURCES,
                       doc="where images come from; digits is embedded (scikit-learn)")
    name: typing.Optional[str] = setting(None, doc="TFDS dataset name, e.g. cifar10")
    data_dir: typing.Optional[str] = setting(
        None, doc="TFDS data_dir, or the image_folder root (train/ with eval/, val/, "
                  "validation/ or test/; or train/ alone; or class folders directly)")
    train_split: typing.Optional[str] = setting(
        None, doc="TFDS split, or image_folder folder, to train on (default: train)")
    eval_split: typing.Optional[str] = setting(
        None, doc="TFDS split to evaluate on (default: test), or image_folder folder "
                  "(default: whichever of eval, val, validation, test is present)")
    eval_fraction: float = setting(0.2, low=0.0, high=1.0, open_low=True, open_high=True,
                                doc="digits, and image folders without an eval folder: "
                                    "stratified, seeded held-out fraction")
    image_size: typing.Optional[int] = setting(
        None, low=1, doc="side of the square model input; default: the dataset's own")
    channels: typing.Optional[int] = setting(
        None, choices=(1, 3), doc="image channels; default: the dataset's own (3 for folders)")
    augment: str = setting("none", choices=AUGMENTS, doc="training augmentation")
    eval_crop_fraction: float = setting(0.875, low=0.0, high=1.0, open_low=True,
                                     doc="imagenet augment: eval centre crop / resize side")
    mean: typing.Optional[typing.Tuple[float, ...]] = setting(
        None, doc="per-channel mean on the raw scale; default: measured on train data")
    std: typing.Optional[typing.Tuple[float, ...]] = setting(
        None, doc="per-channel std on the raw scale; default: measured on train data")
    shuffle_buffer: int = setting(10000, low=1, doc="tfds: tf.data shuffle buffer; digits "
                                                 "and image folders shuffle all indices")
    cache: str = setting("auto", choices=IMAGE_CACHES,
                      doc="image_folder: keep decoded, resized images for the run; auto: "
                          "in memory up to data.cache_memory_mb, else on disk in the run "
                          "directory (cache/images, removed at the end); none: decode "
                          "every epoch")
    cache_memory_mb: int = setting(2048, low=1, doc="image_folder: the in-memory limit of "
                                                 "data.cache auto")
    bad_files: str = setting("skip", choices=BAD_FILES,
                          doc="image_folder: a file that cannot be decoded is left out "
                              "(counted and named in the log and summary.json), or "
                              "stops the run naming it (error)")
    download: bool = setting(False, doc="tfds: download and prepare when missing")
    max_pixels: int = setting(
        64_000_000, low=1, doc="image_folder, kgreedy.predict and the export's encoded "
                               "signature: an image whose header declares more pixels "
                               "(width x height) is a bad file, refused before decoding")


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """One trunk block (`model.blocks[i]`): [downsample] -> conv3x3 -> [BN] -> ReLU."""

    width: int = setting(low=1, doc="output channels of the block's conv")
    downsample: str = setting("none", choices=DOWNSAMPLES, doc="downsampling before the conv")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The trunk (`model.*`)."""

    architecture: typing.Optional[str] = setting(
        None, choices=ARCHITECTURE_NAMES,
        doc="a named model of kgreedy/config/architectures.py. paper_cifar10, "
            "paper_imagenet (their k=1 or k>=2 variant by aux.k) and vgg11 fill "
            "model.blocks and the model's defaults of the keys below and of aux.*; the "
            "residual networks (CIFAR resnet20/32/56/110, ImageNet resnet18/34/50) are "
            "split into model.modules or at model.split_at")
    blocks: typing.Tuple[BlockConfig, ...] = setting(
        (), doc="the trunk, one block per stage (required unless the model is split "
                "into modules)")
    keras_application: typing.Optional[str] = setting(
        None, doc="a keras.applications constructor by name (e.g. MobileNetV2, ResNet50), "
                  "built with weights=None at the data's image size and split into "
                  "modules")
    keras_file: typing.Optional[str] = setting(
        None, doc="a saved .keras model (one image input), loaded in Keras' safe mode "
                  "and split into modules")
    split_at: typing.Optional[typing.Tuple[str, ...]] = setting(
        None, doc="split a residual architecture, keras_application or keras_file "
                  "after these layers (by name, in order): len + 1 modules")
    modules: typing.Union[int, str, None] = setting(
        None, low=1, words=("auto",),
        doc="split a residual architecture, keras_application or keras_file into this "
            "many modules of balanced depth (auto: the fewest, balanced by memory, whose "
            "largest stage fits train.memory_budget; kgreedy.train prints the number "
            "and recipe.json records it)")
    balanced_memory: bool = setting(
        False, doc="model.modules balances the activation size each module writes "
                   "instead of its conv and dense layers")
    batch_norm: bool = setting(True, doc="BN after every conv (blocks and heads)")
    conv_bias: bool = setting(False, doc="trunk convs keep a bias even before BN "
                                      "(torchvision's VGG does; vgg11 sets it)")
    sync_batch_norm: bool = setting(
        False, doc="BN batch statistics over all replicas (several devices/workers)")


@dataclass(frozen=True, kw_only=True)
class AuxStageConfig:
    """One stage's auxiliary design (`aux.per_stage[i]`, stage i+1); null keeps aux.*."""

    head: typing.Optional[str] = setting(None, choices=HEAD_TYPES, doc="this stage's head type")
    k: typing.Optional[int] = setting(None, low=1, doc="this stage's k")
    width: typing.Optional[int] = setting(
        None, low=1, doc="this stage's head width, as is (not doubled at downsamplings)")
    pool_size: typing.Optional[int] = setting(None, low=1, doc="this stage's pool_size")


@dataclass(frozen=True, kw_only=True)
class ObjectiveWeightsConfig:
    """InfoPro's loss weights (`aux.objective_weights`); module j's pair runs linearly
    from `first` (module 1) to `last` (module K)."""

    first: typing.Tuple[float, ...] = setting(doc="(w_rec, w_task) of module 1")
    last: typing.Tuple[float, ...] = setting(doc="(w_rec, w_task) of the last module")


@dataclass(frozen=True, kw_only=True)
class AuxConfig:
    """The auxiliary problem (`aux.*`); docs/DESIGN.md, "The method"."""

    head: str = setting("conv", choices=HEAD_TYPES,
                     doc="conv: the paper's (k-1 conv3x3, pool, BN, linear); mlp_sr: "
                         "Decoupled Greedy Learning's MLP-SR (pool to side/4, k-1 conv1x1, "
                         "pool, 3 hidden dense layers, linear); linear: pool and one linear "
                         "layer (k, width unused); vgg: VGG's classifier (max-pool, "
                         "FC-4096, FC-4096, linear, dropout 0.5)")
    k: int = setting(2, low=1, doc="hidden layers of the auxiliary problem, block included")
    width: typing.Union[int, str] = setting(
        128, low=1, words=("auto",),
        doc="width of the head's k-1 conv layers at stage 1; auto: the output channels "
            "of each stage's block or module (residual architectures' default)")
    grow_with_downsample: bool = setting(
        True, doc="double the head width at every downsampling after block 1, as the "
                  "official code does")
    pool_size: int = setting(2, low=1, doc="the head averages the map to pool_size x pool_size")
    reduction: typing.Optional[int] = setting(
        None, low=1, doc="conv and mlp_sr heads first average the map to 1/reduction of "
                         "its side (default: conv 1, i.e. not at all; mlp_sr 4)")
    last_head: typing.Optional[str] = setting(
        None, choices=LAST_HEAD_TYPES,
        doc="head type of the last stage, the deployed classifier (default: aux.head); "
            "vgg: VGG's FC-4096 x2; model: the split model's own classifier (named "
            "ResNets: global average pool + linear), so the deployed model is exactly "
            "that architecture")
    last_width: typing.Optional[int] = setting(
        None, low=1, doc="width of the last stage's head, the paper's M~_f (default: "
                         "aux.width grown as the other stages')")
    objective: str = setting(
        "cross_entropy", choices=LOCAL_OBJECTIVES,
        doc="what each module trains on: cross_entropy (its head's, the paper's); "
            "infopro: w_rec * reconstruction + w_task * its head's cross-entropy; "
            "infopro_contrast: w_rec * reconstruction + w_task * a supervised "
            "contrastive loss, the head learning on the module's gradient-stopped "
            "output (InfoPro, Wang et al. 2021)")
    objective_weights: typing.Optional[ObjectiveWeightsConfig] = setting(
        None, doc="infopro objectives' (w_rec, w_task) of the first and last module "
                  "(default: InfoPro's ResNet-32 CIFAR-10 settings for K = 2, 4, 8, 16 "
                  "modules, else its K=4 row: first [6, 0], last [1, 2])")
    per_stage: typing.Tuple[AuxStageConfig, ...] = setting(
        (), doc="optional per-stage designs (default: none, every stage uses the keys "
                "above); item i overrides them for stage i+1 (what a per_stage search "
                "writes)")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """A fresh optimizer is built from this at every stage (`train.optimizer.*`)."""

    name: str = setting("sgd", choices=OPTIMIZERS, doc="a new one at every stage")
    learning_rate: float = setting(0.1, low=0.0, open_low=True,
                                doc="initial rate of every stage")
    momentum: float = setting(0.9, low=0.0, high=1.0, open_high=True, doc="sgd only")
    nesterov: bool = setting(False, doc="sgd only")
    beta_1: float = setting(0.9, low=0.0, high=1.0, open_high=True, doc="adamw only")
    beta_2: float = setting(0.999, low=0.0, high=1.0, open_high=True, doc="adamw only")
    weight_decay: float = setting(5e-4, low=0.0, doc="see weight_decay_type")
    weight_decay_type: str = setting(
        "l2", choices=WEIGHT_DECAY_TYPES,
        doc="l2: added to the gradient before momentum (PyTorch, the paper); "
            "decoupled: w -= lr*wd*w (Keras, AdamW)")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Per-stage learning-rate schedule (`train.lr_schedule.*`)."""

    name: str = setting("step", choices=SCHEDULES, doc="restarts at every stage")
    decay_every_epochs: int = setting(15, low=1, doc="step: epochs between decays")
    decay_factor: float = setting(0.2, low=0.0, high=1.0, open_low=True, doc="step: multiplier")
    warmup_epochs: int = setting(0, low=0, doc="linear warm-up at the start of each stage")
    final_fraction: float = setting(0.0, low=0.0, high=1.0, doc="cosine: final lr / initial lr")


@dataclass(frozen=True, kw_only=True)
class DecoupledConfig:
    """Decoupled training (`train.decoupled.*`, with `train.mode: decoupled`)."""

    buffer_size: int = setting(
        0, low=0, doc="0: module j+1 trains on module j's output for the current "
                      "batch; N: on a batch drawn from a replay buffer of module j's "
                      "last N outputs and labels (DGL section 3.2; at least batch_size)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop (`train.*`)."""

    mode: str = setting("greedy", choices=MODES,
                     doc="greedy: stage by stage; end_to_end: the deployed network "
                         "(all blocks + last head) trained jointly, as a baseline; "
                         "decoupled: every module at once, each on its own head's "
                         "loss, no gradient between modules (DGL)")
    epochs_per_stage: int = setting(
        10, low=1, doc="epochs of each stage (end_to_end, decoupled: in all)")
    batch_size: int = setting(128, low=1, doc="global batch size")
    eval_batch_size: typing.Optional[int] = setting(None, low=1, doc="default: batch_size")
    steps_per_epoch: typing.Optional[int] = setting(
        None, low=1, doc="cap on steps per epoch (default: one pass over the train split)")
    steps_per_execution: int = setting(
        8, low=1, doc="train steps run per tf.function call (fewer host round trips)")
    checkpoint_every_steps: typing.Optional[int] = setting(
        None, low=1, doc="also checkpoint mid-epoch every N steps (default: per epoch)")
    deterministic: bool = setting(
        False, doc="op determinism: a resumed run ends bitwise equal to an unbroken one")
    cache_features: str = setting(
        "auto", choices=CACHE_MODES,
        doc="run the frozen modules once per stage and train on their cached output; "
            "auto: when data.augment is none (greedy mode, one worker) and the frozen "
            "modules cost enough FLOPs per cached byte (kgreedy/training/cache.py)")
    cache_memory_mb: int = setting(
        1024, low=0, doc="cached features up to this size stay in memory, else on disk "
                         "in the run directory (removed after the stage)")
    mixed_precision: str = setting(
        "auto", choices=PRECISIONS,
        doc="Keras mixed-precision policy; auto: mixed_bfloat16 where the hardware has "
            "native bfloat16 (x86 AVX512-BF16 or AMX, GPUs of compute capability "
            "8.0+), else none (float32); the run's recipe.json records the choice; "
            "mixed_float16 adds dynamic loss scaling")
    jit_compile: bool = setting(False, doc="XLA-compile the forward and backward pass")
    memory_budget: typing.Optional[str] = setting(
        None, doc="the memory the run's stages may use: \"12GB\", \"512MB\" (units of 1024) "
                  "or \"auto\" (what the device has free); a run that needs more is "
                  "refused before anything is allocated (null: only what is available)")
    optimizer: OptimizerConfig = setting(OptimizerConfig())
    lr_schedule: ScheduleConfig = setting(ScheduleConfig())
    decoupled: DecoupledConfig = setting(DecoupledConfig())


@dataclass(frozen=True, kw_only=True)
class DistributeConfig:
    """The tf.distribute strategy (`distribute.*`)."""

    strategy: str = setting("auto", choices=STRATEGIES,
                         doc="auto: mirrored over several local GPUs, else default")
    devices: typing.Optional[typing.Tuple[str, ...]] = setting(
        None, doc="mirrored only: device names, e.g. [\"/gpu:0\", \"/gpu:1\"]")
    logical_cpus: int = setting(
        1, low=1, doc="split the CPU into N logical devices (mirrored without GPUs)")


@dataclass(frozen=True, kw_only=True)
class EarlyExitConfig:
    """Early-exit export (`export.early_exit.*`, with `export.heads: early_exit`)."""

    max_accuracy_drop: float = setting(
        0.5, low=0, high=100, doc="percentage points of accuracy the exits may lose "
                                  "against the last head, one standard error "
                                  "included; the thresholds with the least mean "
                                  "compute within it are served")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """The SavedModel written after training (`export.*`)."""

    enabled: bool = setting(True, doc="export after training")
    model_name: typing.Optional[str] = setting(None, pattern=NAME_RE,
                                            doc="default: the recipe name")
    version: typing.Optional[int] = setting(None, low=1, doc="default: next free version")
    keep_versions: typing.Optional[int] = setting(
        None, low=1, doc="after exporting, delete all but the newest N versions "
                         "(default: keep all)")
    heads: str = setting("last", choices=EXPORT_HEADS,
                      doc="last: trunk + last head; ensemble: trunk + every head, logits "
                          "averaged with weights 2^j (the paper's Z = sum_j 2^j z_j, "
                          "normalised); early_exit: module by module, each example "
                          "leaving at the first confident head (docs/serving.md); "
                          "greedy and decoupled runs only")
    early_exit: EarlyExitConfig = setting(EarlyExitConfig())


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A whole recipe. Build with `load_recipe` or `recipe_from_dict`."""

    name: str = setting(pattern=NAME_RE, doc="run name; also the default export model name")
    description: str = setting("", doc="free text: what the recipe reproduces, assumptions")
    seed: int = setting(0, low=0, high=SEED_MAX, doc="seeds weights, the digits split "
                                                 "and the shuffle order; 0 to 2^32-1")
    data: DataConfig = setting(DataConfig())
    model: ModelConfig = setting(doc="the trunk")
    aux: AuxConfig = setting(AuxConfig())
    train: TrainConfig = setting(TrainConfig())
    distribute: DistributeConfig = setting(DistributeConfig())
    export: ExportConfig = setting(ExportConfig())

    model_name = property(lambda self: self.export.model_name or self.name)

    @property
    def num_stages(self):
        """Stages of the recipe: its blocks, or the modules its model is split into."""
        model = self.model
        if model.split_at is not None:
            return len(model.split_at) + 1
        if model.modules == "auto":
            return None  # known once kgreedy.train has planned the run
        return model.modules or len(model.blocks)

    @property
    def split(self):
        """Whether the trunk is a model split into modules (not `model.blocks`)."""
        return split_source(self.model) is not None

    def to_dict(self):  # plain JSON; recipe_from_dict(r.to_dict()) == r
        return to_plain(dataclasses.asdict(self))


def validate(recipe):
    """Checks that span several keys."""
    validate_model(recipe)
    data = recipe.data
    if data.source == "tfds" and not data.name:
        raise RecipeError("data.name", "is required when data.source is 'tfds'", data.name)
    if data.source == "image_folder":
        if not data.data_dir:
            raise RecipeError("data.data_dir", "is required when data.source is 'image_"
                              "folder' (the folder of class folders, or of train/ and "
                              "val/)", None)
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
    budget = recipe.train.memory_budget
    if budget is not None and not is_budget(budget):
        raise RecipeError("train.memory_budget", "must be a size such as '12GB' or "
                          "'512MB' (B, KB, MB, GB, TB; units of 1024), or 'auto'", budget)
    if recipe.num_stages is not None and len(recipe.aux.per_stage) > recipe.num_stages:
        raise RecipeError("aux.per_stage", f"has more entries than the "
                          f"{recipe.num_stages} stages of the model",
                          len(recipe.aux.per_stage))
    if recipe.train.cache_features == "on" and recipe.data.augment != "none":
        raise RecipeError("train.cache_features", "'on' needs data.augment 'none': cached "
                          f"features cannot be augmented (data.augment is "
                          f"{recipe.data.augment!r}); use 'auto' or 'off'", "on")
    validate_objective(recipe)
    if recipe.train.cache_features == "on" and recipe.train.mode != "greedy":
        raise RecipeError("train.cache_features", "'on' does not apply to train.mode "
                          f"{recipe.train.mode!r} (every block trains)", "on")
    buffer = recipe.train.decoupled.buffer_size
    if buffer and recipe.train.mode != "decoupled":
        raise RecipeError("train.decoupled.buffer_size", "only applies to train.mode "
                          f"'decoupled', not {recipe.train.mode!r}", buffer)
    if buffer and buffer < recipe.train.batch_size:
        raise RecipeError("train.decoupled.buffer_size", "must hold at least one batch "
                          f"(train.batch_size {recipe.train.batch_size}), or be 0", buffer)
    if recipe.distribute.logical_cpus > 1 and recipe.distribute.strategy not in ("auto",
                                                                               "mirrored"):
        raise RecipeError("distribute.logical_cpus", "only applies to strategies 'auto' and "
                          f"'mirrored', not {recipe.distribute.strategy!r}",
                          recipe.distribute.logical_cpus)
    if recipe.export.heads in ("ensemble", "early_exit") \
            and recipe.train.mode == "end_to_end":
        raise RecipeError("export.heads", f"{recipe.export.heads!r} needs train.mode 'greedy' "
                          "or 'decoupled': an end-to-end run trains only the last head",
                          recipe.export.heads)
    if recipe.export.heads == "early_exit" and (recipe.num_stages or 2) < 2:
        raise RecipeError("export.heads", "'early_exit' needs at least 2 stages: one head "
                          "has no earlier exit", "early_exit")
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
    recipe = build(Recipe, raw, "")
    validate(recipe)
    return recipe


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
    return recipe_from_dict(apply_overrides(read_json(path, kind="recipe file"),
                                            overrides))

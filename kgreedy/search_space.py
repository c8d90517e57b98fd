"""Tune recipes and the search space over the auxiliary problem (`kgreedy.tune`).

A tune recipe is a base train recipe (a path relative to the tune recipe, or an
inline object) plus a search space over the auxiliary design (head type, k, width,
pool size) and the learning rate. It is strict like a train recipe: unknown keys,
wrong types and values out of range raise `RecipeError` naming the key. This module
also turns a trial's hyperparameters into a design, a design into a complete train
recipe, and says when a design does not fit the feature maps.
"""

import dataclasses
import json
import os
import typing
from dataclasses import dataclass

from kgreedy.errors import KgreedyError, RecipeError
from kgreedy.network import head_widths
from kgreedy.recipe import (HEAD_TYPES, AuxStageConfig, Recipe, _NAME_RE, _build, _key,
                            _validate, apply_overrides, check_against_data)

TUNERS = ("random", "hyperband", "bayesian")
SCOPES = ("joint", "per_stage")
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min"}


@dataclass(frozen=True, kw_only=True)
class LearningRateRange:
    """`search.learning_rate`: the range of train.optimizer.learning_rate."""

    min: float = _key(low=0.0, open_low=True, doc="smallest rate")
    max: float = _key(low=0.0, open_low=True, doc="largest rate")
    sampling: str = _key("log", choices=("log", "linear"), doc="how rates are drawn")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """`search.*`: values to try; null keeps the base recipe's value."""

    head: typing.Optional[typing.Tuple[str, ...]] = _key(HEAD_TYPES, doc="aux.head choices")
    k: typing.Optional[typing.Tuple[int, ...]] = _key((1, 2, 3), doc="aux.k choices")
    width: typing.Optional[typing.Tuple[int, ...]] = _key(None, doc="aux.width choices")
    pool_size: typing.Optional[typing.Tuple[int, ...]] = _key((1, 2, 4),
                                                              doc="aux.pool_size choices")
    learning_rate: typing.Optional[LearningRateRange] = _key(None, doc="learning-rate range")


@dataclass(frozen=True, kw_only=True)
class TuneRecipe:
    """A whole tune recipe. Build with `load_tune_recipe` or `tune_recipe_from_dict`."""

    name: str = _key(pattern=_NAME_RE, doc="search name; default output runs/<name>")
    description: str = _key("", doc="free text")
    base: Recipe = _key(doc="the train recipe to tune: a path relative to this file, "
                            "or an inline recipe object")
    search: SearchSpace = _key(SearchSpace())
    tuner: str = _key("random", choices=TUNERS, doc="keras-tuner algorithm")
    max_trials: int = _key(10, low=1, doc="random, bayesian: trials per search")
    objective: str = _key("val_accuracy", choices=tuple(OBJECTIVES),
                          doc="eval metric of the last trained stage")
    scope: str = _key("joint", choices=SCOPES,
                      doc="joint: one design for stages 1..N, scored on stage N; "
                          "per_stage: stage by stage, each keeps its best design")
    stages: typing.Optional[int] = _key(None, low=1,
                                        doc="N stages trained (default: all base blocks)")
    epochs_per_trial: int = _key(3, low=1, doc="epochs per stage in a trial; "
                                               "hyperband: its max_epochs")
    steps_per_epoch: typing.Optional[int] = _key(
        None, low=1, doc="cap on train steps per epoch in trials (default: the base's)")
    hyperband_factor: int = _key(3, low=2, doc="hyperband: reduction factor")
    max_consecutive_failed_trials: typing.Optional[int] = _key(
        None, low=1, doc="stop after this many failed trials in a row (default: never)")
    seed: typing.Optional[int] = _key(None, low=0, doc="tuner seed (default: base seed)")

    @property
    def num_stages(self):
        return self.stages or len(self.base.model.blocks)

    def to_dict(self):
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _prefixed(error, prefix):
    return RecipeError(f"{prefix}.{error.path}" if error.path else prefix, error.message,
                       *([] if error.received is KgreedyError._MISSING else [error.received]))


def _check_choices(space):
    for key in ("head", "k", "width", "pool_size"):
        values = getattr(space, key)
        if values is None:
            continue
        if not values:
            raise RecipeError(f"search.{key}", "needs at least one value (null: keep "
                              "the base recipe's)", [])
        if len(set(values)) != len(values):
            raise RecipeError(f"search.{key}", "has a value twice", list(values))
        for i, value in enumerate(values):
            if key == "head" and value not in HEAD_TYPES:
                raise RecipeError(f"search.head[{i}]", "must be one of "
                                  + ", ".join(map(repr, HEAD_TYPES)), value)
            if key != "head" and value < 1:
                raise RecipeError(f"search.{key}[{i}]", "must be >= 1", value)
    lr = space.learning_rate
    if lr is not None and lr.min > lr.max:
        raise RecipeError("search.learning_rate.max", f"must be >= min ({lr.min})", lr.max)


def tune_recipe_from_dict(raw):
    """Builds and validates a `TuneRecipe` from a parsed JSON object (base inline)."""
    if not isinstance(raw, dict):
        raise RecipeError("", "a tune recipe must be a JSON object", raw)
    if isinstance(raw.get("base"), str):
        raise RecipeError("base", "a path is resolved by load_tune_recipe; pass an object",
                          raw["base"])
    tune = _build(TuneRecipe, raw, "")
    try:
        _validate(tune.base)
    except RecipeError as e:
        raise _prefixed(e, "base") from None
    base = tune.base
    _check_choices(tune.search)
    if tune.stages is not None and tune.stages > len(base.model.blocks):
        raise RecipeError("stages", f"must be <= the {len(base.model.blocks)} blocks of "
                          "base.model.blocks", tune.stages)
    if base.train.mode != "greedy":
        raise RecipeError("base.train.mode", "must be 'greedy': trials train stage by "
                          "stage", base.train.mode)
    if base.distribute.strategy == "multi_worker":
        raise RecipeError("base.distribute.strategy", "'multi_worker' is not supported "
                          "by the search (one process runs every trial)", "multi_worker")
    if base.aux.per_stage:
        raise RecipeError("base.aux.per_stage", "must be empty: the search chooses the "
                          "auxiliary design", len(base.aux.per_stage))
    return tune


def load_tune_recipe(path, overrides=()):
    """Reads a tune recipe, inlines its base, applies `--set` overrides, validates.

    Args:
        path: the tune recipe JSON file.
        overrides: `KEY=VALUE` strings (`max_trials=3`, `base.train.batch_size=32`).

    Raises:
        KgreedyError: a file is missing or not JSON, or an override is malformed.
        RecipeError: a key of the tune recipe or of its base is wrong.
    """
    raw = _read_json(path, str(path))
    if isinstance(raw, dict) and isinstance(raw.get("base"), str):
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), raw["base"])
        raw = {**raw, "base": _read_json(base_path, "base")}
    return tune_recipe_from_dict(apply_overrides(raw, overrides))


def _read_json(path, key):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise KgreedyError(key, "recipe file not found", str(path)) from None
    except IsADirectoryError:
        raise KgreedyError(key, "recipe path is a directory, not a JSON file",
                           str(path)) from None
    except json.JSONDecodeError as e:
        raise KgreedyError(key, f"{path} is not valid JSON: {e.msg} at line {e.lineno} "
                           f"column {e.colno}") from None


# ------------------------------------------------------------------ space ----

def declare(hp, tune, searched_stage):
    """Declares the hyperparameters of one search in a keras-tuner `hp`.

    k and width only exist for heads that have them (a conditional scope on head).
    The learning rate is searched once: jointly, or with stage 1 in a per_stage
    search (a recipe has one learning rate for all stages).
    """
    space, aux = tune.search, tune.base.aux
    heads = list(space.head or (aux.head,))
    hp.Choice("head", heads)
    with_layers = [h for h in heads if h != "linear"]
    if with_layers:
        with hp.conditional_scope("head", with_layers):
            hp.Choice("k", list(space.k or (aux.k,)))
            hp.Choice("width", list(space.width or (aux.width,)))
    hp.Choice("pool_size", list(space.pool_size or (aux.pool_size,)))
    lr = space.learning_rate
    if lr is not None and (tune.scope == "joint" or searched_stage == 1):
        hp.Float("learning_rate", lr.min, lr.max, sampling=lr.sampling)


def design_from(values, tune):
    """A design {head, k, width, pool_size} from a trial's hyperparameter values.

    `linear` has no hidden layer: k is 1 and the width is the base's (unused).
    """
    aux = tune.base.aux
    head = values["head"]
    if head == "linear":
        return {"head": head, "k": 1, "width": aux.width, "pool_size": values["pool_size"]}
    return {"head": head, "k": values["k"], "width": values["width"],
            "pool_size": values["pool_size"]}


def searched_values(values):
    """The hyperparameter values a person reads (keras-tuner's `tuner/*` left out)."""
    return {k: v for k, v in values.items() if not k.startswith("tuner/")}


def candidate_recipe(tune, designs, learning_rate=None, name=None):
    """The complete train recipe that uses `designs`.

    Joint scope: one design, as aux.* (every stage uses it). Per-stage scope: one
    design per searched stage in aux.per_stage, with the widths the stages train
    (doubled at downsamplings as aux.grow_with_downsample says); later stages keep
    the base recipe's aux.*.
    """
    base = tune.base
    if tune.scope == "joint":
        design = designs[0]
        aux = dataclasses.replace(base.aux, head=design["head"], k=design["k"],
                                  width=design["width"], pool_size=design["pool_size"])
    else:
        # Each stage's growth factor, by the rule the network applies to aux.width.
        unit = dataclasses.replace(base, aux=dataclasses.replace(
            base.aux, width=1, per_stage=(), last_width=None))
        entries = [AuxStageConfig(head=design["head"], k=design["k"],
                                  width=design["width"] * factor,
                                  pool_size=design["pool_size"])
                   for design, factor in zip(designs, head_widths(unit))]
        aux = dataclasses.replace(base.aux, per_stage=tuple(entries))
    train = base.train
    if learning_rate is not None:
        train = dataclasses.replace(train, optimizer=dataclasses.replace(
            train.optimizer, learning_rate=float(learning_rate)))
    return dataclasses.replace(base, name=name or base.name, aux=aux, train=train)


def trial_recipe(tune, candidate, stages):
    """What a trial trains: `candidate` cut to its first `stages` blocks, with the
    trial's epochs and step cap, without export."""
    blocks = candidate.model.blocks[:stages]
    aux = dataclasses.replace(candidate.aux, per_stage=candidate.aux.per_stage[:stages])
    train = dataclasses.replace(candidate.train, epochs_per_stage=tune.epochs_per_trial,
                                steps_per_epoch=tune.steps_per_epoch
                                or candidate.train.steps_per_epoch)
    if stages < len(candidate.model.blocks):
        # The trial's last stage is not the model's: it keeps the ordinary head, and
        # the cut trunk is no longer the named architecture.
        aux = dataclasses.replace(aux, last_head=None, last_width=None)
        model = dataclasses.replace(candidate.model, blocks=blocks, architecture=None)
    else:
        model = candidate.model
    return dataclasses.replace(
        candidate, name=f"{tune.name}_trial", aux=aux, train=train, model=model,
        export=dataclasses.replace(candidate.export, enabled=False))


def map_sides(recipe, image_size):
    """Side of the feature map after each block."""
    sides, side = [], image_size
    for block in recipe.model.blocks:
        side = side // 2 if block.downsample != "none" else side
        sides.append(side)
    return sides


def pool_problem(recipe, image_size, first, last):
    """Why stages `first`..`last` of `recipe` cannot pool as their heads ask, or None."""
    from kgreedy.network import head_designs

    designs = head_designs(recipe)
    for j, side in enumerate(map_sides(recipe, image_size), start=1):
        pool = designs[j - 1]["pool_size"]
        if first <= j <= last and side < pool:
            return (f"aux.pool_size {pool} is larger than the {side}x{side} feature map "
                    f"of stage {j}")
    return None


def check_base(tune, image_size, num_replicas):
    """Checks the base recipe against the data as `kgreedy.train` would: what fails
    here is a configuration mistake, not a searched design (exit status 2)."""
    try:
        check_against_data(tune.base, image_size, num_replicas)
    except RecipeError as e:
        raise _prefixed(e, "base") from None

"""Tune recipes (`kgreedy.tune`): a base train recipe and a search space.

A tune recipe is a base train recipe (a path relative to the tune recipe, or an
inline object) plus a search space over the auxiliary design (head type, k, width,
pool size), the learning rate and the local objective (`aux.objective` and its
`aux.objective_weights`). It is strict like a train recipe: unknown keys,
wrong types and values out of range raise `RecipeError` naming the key. What the
space means to keras-tuner is `kgreedy.tuning.space`.
"""

import dataclasses
import json
import os
import typing
from dataclasses import dataclass

from kgreedy.base.errors import RecipeError
from kgreedy.base.files import read_json
from kgreedy.config.data_checks import check_against_data
from kgreedy.config.recipe import (SEED_MAX, ObjectiveWeightsConfig, Recipe,
                                   apply_overrides, validate)
from kgreedy.config.schema import build, setting, to_plain
from kgreedy.config.vocabulary import (HEAD_TYPES, LOCAL_OBJECTIVES, NAME_RE, OBJECTIVES,
                                       SCOPES, TUNERS)


@dataclass(frozen=True, kw_only=True)
class LearningRateRange:
    """`search.learning_rate`: the range of train.optimizer.learning_rate."""

    min: float = setting(low=0.0, open_low=True, doc="smallest rate")
    max: float = setting(low=0.0, open_low=True, doc="largest rate")
    sampling: str = setting("log", choices=("log", "linear"), doc="how rates are drawn")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """`search.*`: values to try; null keeps the base recipe's value."""

    head: typing.Optional[typing.Tuple[str, ...]] = setting(HEAD_TYPES, doc="aux.head choices")
    k: typing.Optional[typing.Tuple[int, ...]] = setting((1, 2, 3), doc="aux.k choices")
    width: typing.Optional[typing.Tuple[int, ...]] = setting(None, doc="aux.width choices")
    pool_size: typing.Optional[typing.Tuple[int, ...]] = setting((1, 2, 4),
                                                              doc="aux.pool_size choices")
    learning_rate: typing.Optional[LearningRateRange] = setting(None, doc="learning-rate range")
    aux_objective: typing.Optional[typing.Tuple[str, ...]] = setting(
        None, doc="aux.objective choices")
    objective_weights: typing.Optional[typing.Tuple[ObjectiveWeightsConfig, ...]] = setting(
        None, doc="aux.objective_weights choices, tried with the infopro objectives")


@dataclass(frozen=True, kw_only=True)
class TuneRecipe:
    """A whole tune recipe. Build with `load_tune_recipe` or `tune_recipe_from_dict`."""

    name: str = setting(pattern=NAME_RE, doc="search name; default output runs/<name>")
    description: str = setting("", doc="free text")
    base: Recipe = setting(doc="the train recipe to tune: a path relative to this file, "
                            "or an inline recipe object")
    search: SearchSpace = setting(SearchSpace())
    tuner: str = setting("random", choices=TUNERS, doc="keras-tuner algorithm")
    max_trials: int = setting(10, low=1, doc="random, bayesian: trials per search")
    objective: str = setting("val_accuracy", choices=tuple(OBJECTIVES),
                          doc="eval metric of the last trained stage")
    scope: str = setting("joint", choices=SCOPES,
                      doc="joint: one design for stages 1..N, scored on stage N; "
                          "per_stage: stage by stage, each keeps its best design")
    stages: typing.Optional[int] = setting(None, low=1,
                                        doc="N stages trained (default: all of the base "
                                            "model's blocks or modules)")
    epochs_per_trial: int = setting(3, low=1, doc="epochs per stage in a trial; "
                                               "hyperband: its max_epochs")
    steps_per_epoch: typing.Optional[int] = setting(
        None, low=1, doc="cap on train steps per epoch in trials (default: the base's)")
    hyperband_factor: int = setting(3, low=2, doc="hyperband: reduction factor")
    max_consecutive_failed_trials: typing.Optional[int] = setting(
        None, low=1, doc="stop after this many failed trials in a row (default: never)")
    seed: typing.Optional[int] = setting(None, low=0, high=SEED_MAX,
                                      doc="tuner seed (default: base seed)")

    @property
    def num_stages(self):
        return self.stages or self.base.num_stages

    def to_dict(self):
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _prefixed(error, prefix):
    return error.at(f"{prefix}.{error.path}" if error.path else prefix)


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


def _check_objective_choices(space, base):
    """Checks search.aux_objective and search.objective_weights against each other
    and the base: every combination a trial can draw must make a valid recipe."""
    objectives, weights = space.aux_objective, space.objective_weights
    for key, values in (("aux_objective", objectives), ("objective_weights", weights)):
        if values is not None and not values:
            raise RecipeError(f"search.{key}", "needs at least one value (null: keep "
                              "the base recipe's)", [])
    if objectives is not None:
        if len(set(objectives)) != len(objectives):
            raise RecipeError("search.aux_objective", "has a value twice", list(objectives))
        for i, value in enumerate(objectives):
            if value not in LOCAL_OBJECTIVES:
                raise RecipeError(f"search.aux_objective[{i}]", "must be one of "
                                  + ", ".join(map(repr, LOCAL_OBJECTIVES)), value)
            # auto turns the cache off for these; "on" is refused by the train recipe.
            if value != "cross_entropy" and base.train.cache_features == "on":
                raise RecipeError(f"search.aux_objective[{i}]", f"{value!r} cannot run "
                                  "with base.train.cache_features 'on' (its decoder "
                                  "rebuilds the input image, which cached features do "
                                  "not hold); set it to 'auto' or 'off'", value)
    if weights is None:
        return
    for i, choice in enumerate(weights):
        for key in ("first", "last"):
            pair = getattr(choice, key)
            if len(pair) != 2 or not all(w >= 0 for w in pair):  # build checked finite
                raise RecipeError(f"search.objective_weights[{i}].{key}", "must be two "
                                  "finite weights >= 0, [w_rec, w_task]", list(pair))
    plain = [to_plain(dataclasses.asdict(w)) for w in weights]
    if any(plain.count(w) > 1 for w in plain):
        raise RecipeError("search.objective_weights", "has a value twice", plain)
    if all(o == "cross_entropy" for o in objectives or (base.aux.objective,)):
        raise RecipeError("search.objective_weights", "only applies to aux.objective "
                          "'infopro' or 'infopro_contrast', and every objective the search "
                          "can pick is 'cross_entropy' (search.aux_objective, or the base's "
                          "aux.objective when it is null)", plain)


def tune_recipe_from_dict(raw):
    """Builds and validates a `TuneRecipe` from a parsed JSON object (base inline)."""
    if not isinstance(raw, dict):
        raise RecipeError("", "a tune recipe must be a JSON object", raw)
    if isinstance(raw.get("base"), str):
        raise RecipeError("base", "a path is resolved by load_tune_recipe; pass an object",
                          raw["base"])
    tune = build(TuneRecipe, raw, "")
    try:
        validate(tune.base)
    except RecipeError as e:
        raise _prefixed(e, "base") from None
    base = tune.base
    if base.model.modules == "auto":
        raise RecipeError("base.model.modules", "'auto' is planned by kgreedy.train "
                          "against train.memory_budget; the search needs the number of "
                          "modules: give it", "auto")
    _check_choices(tune.search)
    _check_objective_choices(tune.search, base)
    if tune.stages is not None and tune.stages > base.num_stages:
        raise RecipeError("stages", f"must be <= the {base.num_stages} stages of "
                          "the base model", tune.stages)
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
    raw = read_json(path, kind="tune recipe file")
    if isinstance(raw, dict) and isinstance(raw.get("base"), str):
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), raw["base"])
        raw = {**raw, "base": read_json(base_path, "base", kind="recipe file")}
    return tune_recipe_from_dict(apply_overrides(raw, overrides))


def check_base(tune, image_size, num_replicas):
    """Checks the base recipe against the data as `kgreedy.train` would: what fails
    here is a configuration mistake, not a searched design (exit status 2)."""
    try:
        check_against_data(tune.base, image_size, num_replicas)
    except RecipeError as e:
        raise _prefixed(e, "base") from None

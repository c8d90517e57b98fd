"""Checks of a recipe's model keys across each other: a trunk of `model.blocks`, or one
model to split into modules (a residual `model.architecture`, `model.keras_application`
or `model.keras_file`) with exactly one of `model.modules` and `model.split_at`; and
the local objective's keys (`aux.objective*`) against the model's training."""

import dataclasses
import math

from kgreedy.base.errors import RecipeError
from kgreedy.config import architectures
from kgreedy.config.schema import to_plain


def split_source(model):
    """The key naming a model to split (`model.architecture` for a residual one,
    `model.keras_application`, `model.keras_file`), or None for `model.blocks`."""
    named = [key for key, value in (
        ("architecture", model.architecture in architectures.RESIDUAL or None),
        ("keras_application", model.keras_application),
        ("keras_file", model.keras_file)) if value is not None]
    if len(named) > 1:
        raise RecipeError(f"model.{named[1]}", f"a recipe names one model; it also has "
                          f"model.{named[0]}", getattr(model, named[1]))
    return f"model.{named[0]}" if named else None


def validate_model(recipe):
    """The model keys' checks across keys: blocks, or one model to split and how."""
    model, source = recipe.model, split_source(recipe.model)
    if source is None:
        if not model.blocks:
            raise RecipeError("model.blocks", "needs at least one block (or set "
                              "model.architecture, model.keras_application or "
                              "model.keras_file)", [])
        for key in ("split_at", "modules"):
            if getattr(model, key) is not None:
                raise RecipeError(f"model.{key}", "splits a residual architecture, "
                                  "model.keras_application or model.keras_file; this "
                                  "recipe's trunk is model.blocks", getattr(model, key))
        if recipe.aux.last_head == "model":
            raise RecipeError("aux.last_head", "'model' keeps a split model's own "
                              "classifier; model.blocks has none", "model")
        return
    if model.blocks:
        raise RecipeError("model.blocks", f"a recipe with {source} splits that model into "
                          "modules and has no model.blocks; leave them out",
                          [b.width for b in model.blocks])
    if model.split_at is None and model.modules is None:
        raise RecipeError("model.modules", f"{source} {getattr(model, source[6:])!r} is "
                          "split into modules: set model.modules (K modules of balanced "
                          "depth) or model.split_at (layer names)", None)
    if model.split_at is not None and model.modules is not None:
        raise RecipeError("model.split_at", "give model.modules or model.split_at, not "
                          "both", list(model.split_at))
    if model.split_at is not None and model.balanced_memory:
        raise RecipeError("model.balanced_memory", "only applies to model.modules, not "
                          "model.split_at", True)
    if model.keras_application is not None and not model.keras_application.isidentifier():
        raise RecipeError("model.keras_application", "must be the name of a "
                          "keras.applications constructor, e.g. 'MobileNetV2'",
                          model.keras_application)


def validate_objective(recipe):
    """Refuses objective weights that do not apply or are not two finite weights >= 0,
    and a feature cache forced on under an objective that rebuilds the image."""
    aux = recipe.aux
    if aux.objective_weights is not None:
        if aux.objective == "cross_entropy":
            raise RecipeError("aux.objective_weights", "only applies to aux.objective "
                              "'infopro' or 'infopro_contrast', not 'cross_entropy'",
                              to_plain(dataclasses.asdict(aux.objective_weights)))
        for key in ("first", "last"):
            pair = getattr(aux.objective_weights, key)
            if len(pair) != 2 or not all(math.isfinite(w) and w >= 0 for w in pair):
                raise RecipeError(f"aux.objective_weights.{key}", "must be two finite "
                                  "weights >= 0, [w_rec, w_task]", list(pair))
    if aux.objective != "cross_entropy" and recipe.train.cache_features == "on":
        raise RecipeError("train.cache_features", f"'on' cannot serve aux.objective "
                          f"{aux.objective!r}: its decoder rebuilds the input image, which "
                          "cached features do not hold; use 'auto' or 'off'", "on")

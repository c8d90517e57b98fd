"""The search space in keras-tuner's terms: hyperparameters declared from a tune
recipe, a trial's values turned into an auxiliary design, and a design into the
complete train recipe a trial trains."""

import dataclasses

from kgreedy.config.designs import head_designs, head_widths
from kgreedy.config.recipe import AuxStageConfig
from kgreedy.model.from_recipe import trunk_shapes


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
        # A width of "auto" (each stage's own output channels) stays aux.width's.
        entries = [AuxStageConfig(head=design["head"], k=design["k"],
                                  width=None if design["width"] == "auto"
                                  else design["width"] * factor,
                                  pool_size=design["pool_size"])
                   for design, factor in zip(designs, head_widths(unit))]
        aux = dataclasses.replace(base.aux, per_stage=tuple(entries))
    train = base.train
    if learning_rate is not None:
        train = dataclasses.replace(train, optimizer=dataclasses.replace(
            train.optimizer, learning_rate=float(learning_rate)))
    return dataclasses.replace(base, name=name or base.name, aux=aux, train=train)


def trial_recipe(tune, candidate, stages):
    """What a trial trains: `candidate` with the trial's epochs and step cap, without
    export; the trial builds and trains only its first `stages` stages
    (`from_recipe(..., stages=stages)`).

    The recipe keeps the candidate's whole model, so a split model's module
    boundaries are those of the whole model (modules 1..stages of the trial are the
    same layers as in the final run), and a stage before the last keeps the
    ordinary head where the model's last stage would have aux.last_head.
    """
    aux = dataclasses.replace(candidate.aux, per_stage=candidate.aux.per_stage[:stages])
    train = dataclasses.replace(candidate.train, epochs_per_stage=tune.epochs_per_trial,
                                steps_per_epoch=tune.steps_per_epoch
                                or candidate.train.steps_per_epoch)
    return dataclasses.replace(
        candidate, name=f"{tune.name}_trial", aux=aux, train=train,
        export=dataclasses.replace(candidate.export, enabled=False))


def stage_sides(recipe, image_shape, num_classes):
    """Side (the smaller of height and width) of each stage's feature map, for
    every stage of the recipe's trunk: blocks or the modules of a split model.

    Raises:
        RecipeError: a split model cannot be built, loaded or split as the recipe
            asks.
    """
    return [min(shape[:2]) for shape in trunk_shapes(recipe, image_shape, num_classes)]


def pool_problem(recipe, sides, first, last):
    """Why stages `first`..`last` of `recipe` cannot pool as their heads ask, or None.

    Args:
        recipe: the candidate recipe.
        sides: `stage_sides` of its trunk.
        first: the first stage checked.
        last: the last stage checked.
    """
    designs = head_designs(recipe)
    for j, side in enumerate(sides, start=1):
        design = designs[j - 1]
        if not first <= j <= last or design["kind"] == "model":  # the model's own top
            continue
        pool = design["pool_size"]
        if side < pool:
            return (f"aux.pool_size {pool} is larger than the {side}x{side} feature map "
                    f"of stage {j}")
    return None

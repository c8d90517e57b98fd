"""The search space in keras-tuner's terms: hyperparameters declared from a tune
recipe, a trial's values turned into a head design (a
`kgreedy.config.designs.HeadDesign`, the type the recipe and the model use) and a
local objective, and those into the complete train recipe a trial trains."""

import dataclasses

from kgreedy.config.designs import HeadDesign, head_designs, head_widths
from kgreedy.config.recipe import AuxStageConfig, ObjectiveWeightsConfig
from kgreedy.model.from_recipe import trunk_shapes


def declare(hp, tune, searched_stage):
    """Declares the hyperparameters of one search in a keras-tuner `hp`.

    k and width only exist for heads that have them (a conditional scope on head).
    The learning rate and the local objective are searched once: jointly, or with
    stage 1 in a per_stage search (a recipe has one of each for all stages).
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
    if tune.scope == "per_stage" and searched_stage > 1:
        return
    lr = space.learning_rate
    if lr is not None:
        hp.Float("learning_rate", lr.min, lr.max, sampling=lr.sampling)
    _declare_objective(hp, tune)


def _declare_objective(hp, tune):
    """`aux_objective` and `objective_weights`, each only where the tune recipe
    searches it; the weights only exist for the infopro objectives (a cross_entropy
    trial has none)."""
    space = tune.search
    objectives = space.aux_objective
    if objectives is not None:
        hp.Choice("aux_objective", list(objectives))
    if space.objective_weights is None:
        return
    weights = [encode_weights(w) for w in space.objective_weights]
    if objectives is None:  # the base's objective, an infopro one (tune_recipe checks)
        hp.Choice("objective_weights", weights)
        return
    with hp.conditional_scope("aux_objective",
                              [o for o in objectives if o != "cross_entropy"]):
        hp.Choice("objective_weights", weights)


def _number(w):
    # repr: the shortest text that reads back as the same float; 6.0 reads as 6
    # (but 1e+20 stays so, not twenty-one digits).
    w = float(w)
    return str(int(w)) if w.is_integer() and abs(w) < 1e16 else repr(w)


def encode_weights(weights):
    """An `ObjectiveWeightsConfig` as a keras-tuner Choice value, whose values must
    be scalars: "w_rec,w_task>w_rec,w_task" (first > last), e.g. "6,0>1,2"."""
    return ">".join(",".join(map(_number, pair)) for pair in (weights.first, weights.last))


def decode_weights(text):
    """The `ObjectiveWeightsConfig` of an `encode_weights` string.

    Raises:
        ValueError: `text` is not two pairs of numbers.
    """
    try:
        first, last = (tuple(float(w) for w in pair.split(","))
                       for pair in text.split(">"))
    except ValueError:
        first = last = ()
    if len(first) != 2 or len(last) != 2:
        raise ValueError(f"objective weights must read 'w_rec,w_task>w_rec,w_task'. "
                         f"Received: {text!r}")
    return ObjectiveWeightsConfig(first=first, last=last)


def plain_weights(weights):
    """An `ObjectiveWeightsConfig` (or None) as JSON shows it: {"first", "last"}."""
    return None if weights is None else {"first": list(weights.first),
                                         "last": list(weights.last)}


def objective_from(values, tune):
    """(aux.objective, aux.objective_weights as `plain_weights`) of a trial's values.

    An objective the search does not draw is the base's; so are the weights of an
    infopro objective when none are drawn (None: the network's defaults). A
    cross_entropy objective has no weights.
    """
    aux = tune.base.aux
    objective = values.get("aux_objective", aux.objective)
    if objective == "cross_entropy":
        return objective, None
    if "objective_weights" in values:
        return objective, plain_weights(decode_weights(values["objective_weights"]))
    return objective, plain_weights(aux.objective_weights)


def design_from(values, tune):
    """The `HeadDesign` of a trial's hyperparameter values: head, k, width, pool_size.

    `linear` has no hidden layer: k is 1 and the width is the base's (unused), as
    tuning.json has always recorded them. `reduction` is not searched: it is None
    here, and the trial's recipe keeps the base's aux.reduction (`candidate_recipe`),
    so a design's JSON form (`HeadDesign.to_dict`) is {head, k, width, pool_size}.
    """
    head = values["head"]
    if head == "linear":
        return HeadDesign(head, 1, tune.base.aux.width, values["pool_size"])
    return HeadDesign(head, values["k"], values["width"], values["pool_size"])


def searched_values(values):
    """The hyperparameter values a person reads (keras-tuner's `tuner/*` left out)."""
    return {k: v for k, v in values.items() if not k.startswith("tuner/")}


def candidate_recipe(tune, designs, learning_rate=None, name=None, local_objective=None):
    """The complete train recipe that uses `designs`, `HeadDesign`s (`design_from`).

    Joint scope: one design, as aux.* (every stage uses it). Per-stage scope: one
    design per searched stage in aux.per_stage, with the widths the stages train
    (doubled at downsamplings as aux.grow_with_downsample says); later stages keep
    the base recipe's aux.*. A design's head, k, width and pool_size are used (None:
    the base's); aux.reduction is the base's, for every stage. `local_objective` is
    an `objective_from` pair, written as aux.objective and aux.objective_weights
    (None: the base's).

    Raises:
        ValueError: a design is not a `HeadDesign`, or sets a reduction other than
            the base's aux.reduction.
    """
    base = tune.base
    for design in designs:
        if not isinstance(design, HeadDesign):
            raise ValueError(f"Each design must be a HeadDesign. Received: {design!r}")
        if design.reduction not in (None, base.aux.reduction):
            raise ValueError(f"A trial's recipe keeps the base's aux.reduction "
                             f"({base.aux.reduction}). Received: {design!r}")
    if local_objective is not None:
        objective, weights = local_objective
        base = dataclasses.replace(base, aux=dataclasses.replace(
            base.aux, objective=objective, objective_weights=None if weights is None
            else ObjectiveWeightsConfig(first=tuple(weights["first"]),
                                        last=tuple(weights["last"]))))
    if tune.scope == "joint":
        design = designs[0]
        aux = dataclasses.replace(base.aux, **{
            key: getattr(base.aux, key) if value is None else value
            for key, value in (("head", design.kind), ("k", design.k),
                               ("width", design.width), ("pool_size", design.pool_size))})
    else:
        # Each stage's growth factor, by the rule the network applies to aux.width.
        unit = dataclasses.replace(base, aux=dataclasses.replace(
            base.aux, width=1, per_stage=(), last_width=None))
        # A width of "auto" (each stage's own output channels) stays aux.width's.
        entries = [AuxStageConfig(head=design.kind, k=design.k,
                                  width=None if design.width in (None, "auto")
                                  else design.width * factor,
                                  pool_size=design.pool_size)
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

    Each head's pool_size is checked against its stage's map, a vgg head's too
    although it does not pool (`kgreedy.model.network.pool_problem` skips it); a
    split model's own classifier is not. For a trunk of blocks that is what
    `kgreedy.config.data_checks.check_against_data` refuses in a train recipe
    (aux.pool_size against every block's map, whatever the head), so a best
    recipe this passes is one kgreedy.train accepts.

    Args:
        recipe: the candidate recipe.
        sides: `stage_sides` of its trunk.
        first: the first stage checked.
        last: the last stage checked.
    """
    designs = head_designs(recipe)
    for j, side in enumerate(sides, start=1):
        design = designs[j - 1]
        if not first <= j <= last or design.kind == "model":  # the model's own top
            continue
        pool = design.pool_size
        if side < pool:
            return (f"aux.pool_size {pool} is larger than the {side}x{side} feature map "
                    f"of stage {j}")
    return None

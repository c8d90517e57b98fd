"""What a recipe's aux.* keys mean for each stage: its head's width and design.

Plain dictionaries out of a recipe, so the model is built from them without knowing
the recipe (`kgreedy.model.from_recipe`).
"""

from kgreedy.base.errors import RecipeError


def head_widths(recipe):
    """Width of each stage's head: aux.width at block 1, doubled at every later
    downsampling, unless aux.per_stage gives the stage its own width (taken as is);
    aux.last_width, when set, is the last stage's.

    A downsampling in block 1 itself (psi on the input image, as the ImageNet
    models do) does not double: aux.width is the width at block 1's output.
    aux.width "auto" is each block's own width; for a model split into modules it
    stays "auto", which the network resolves to each module's output channels
    (and aux.width as a number is then every stage's: modules have no
    downsampling flag to grow it by).
    """
    widths, width = [], recipe.aux.width
    per_stage = recipe.aux.per_stage
    if recipe.split:
        stages = [width] * recipe.num_stages
    elif width == "auto":
        stages = [block.width for block in recipe.model.blocks]
    else:
        stages = []
        for j, block in enumerate(recipe.model.blocks):
            if j > 0 and block.downsample != "none" and recipe.aux.grow_with_downsample:
                width *= 2
            stages.append(width)
    for j, width in enumerate(stages):
        own = per_stage[j].width if j < len(per_stage) else None
        widths.append(width if own is None else own)
    if recipe.aux.last_width is not None:
        widths[-1] = recipe.aux.last_width
    return widths


def head_designs(recipe):
    """Per stage: the head's `kind`, `k`, `width`, `pool_size` and `reduction` (aux.*,
    with the stage's aux.per_stage entry where one is given; aux.last_head for the
    last stage).

    Raises:
        RecipeError: aux.per_stage has more entries than there are blocks.
    """
    aux = recipe.aux
    if len(aux.per_stage) > recipe.num_stages:
        raise RecipeError("aux.per_stage", f"has {len(aux.per_stage)} entries but "
                          f"the model has {recipe.num_stages} stages", len(aux.per_stage))
    designs = []
    for j, width in enumerate(head_widths(recipe)):
        own = aux.per_stage[j] if j < len(aux.per_stage) else None

        def pick(key, own=own):
            value = None if own is None else getattr(own, key)
            return getattr(aux, key) if value is None else value

        designs.append({"kind": pick("head"), "k": pick("k"), "width": width,
                        "pool_size": pick("pool_size"), "reduction": aux.reduction})
    if aux.last_head is not None:
        designs[-1]["kind"] = aux.last_head
    return designs

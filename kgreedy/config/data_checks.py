"""Recipe checks that need the data's image size or the replica count, known only
once the data is described and the strategy made (`check_against_data`)."""

from kgreedy.base.errors import RecipeError
from kgreedy.config.designs import head_designs


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
    last = len(sides) - 1
    # A split model's feature maps are known once it is built:
    # kgreedy.model.from_recipe checks its heads against them.
    for i, design in enumerate(head_designs(recipe)[:len(sides)]):
        if design.kind == "vgg" and sides[i] < 2:
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

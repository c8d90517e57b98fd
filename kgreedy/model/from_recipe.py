"""The model's edge: a `GreedyNet` from a recipe.

The net itself takes plain arguments (`kgreedy.model.network.GreedyNet`); this is the
one place that reads a recipe for it.
"""

from kgreedy.config.designs import head_designs
from kgreedy.model.network import GreedyNet


def from_recipe(recipe, image_shape, num_classes, mean, std):
    """The `GreedyNet` a recipe describes, for data of `image_shape` and `num_classes`.

    Args:
        recipe: a validated `kgreedy.config.recipe.Recipe`.
        image_shape: (height, width, channels) of the model input.
        num_classes: classes of the task.
        mean: per-channel mean of raw pixels.
        std: per-channel std of raw pixels.
    """
    model = recipe.model
    return GreedyNet([{"width": b.width, "downsample": b.downsample} for b in model.blocks],
                     head_designs(recipe), image_shape, num_classes, mean, std,
                     batch_norm=model.batch_norm, sync_batch_norm=model.sync_batch_norm,
                     conv_bias=model.conv_bias, name=recipe.name)

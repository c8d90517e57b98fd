"""The model's edge: a `GreedyNet` from a recipe.

The net itself takes plain arguments (`kgreedy.model.network.GreedyNet`); this is the
one place that reads a recipe for it: plain blocks, or a whole model (a named
ResNet, a `keras.applications` constructor, a saved `.keras` file) split into
modules.
"""

import os

import keras

from kgreedy.base.errors import RecipeError
from kgreedy.config import architectures
from kgreedy.config.designs import head_designs
from kgreedy.model import resnets, split
from kgreedy.model.layers import BN_MOMENTUM, conv_blocks
from kgreedy.model.network import PIXEL_MAX, GreedyNet, output_shapes, pool_problem
from kgreedy.model.objectives import objective_for

# White of each source's raw pixels: scikit-learn's digits are 0..16, images 0..255.
SOURCE_PIXEL_MAX = {"digits": 16.0}


def from_recipe(recipe, image_shape, num_classes, mean, std, stages=None):
    """The `GreedyNet` a recipe describes, for data of `image_shape` and `num_classes`.

    Args:
        recipe: a validated `kgreedy.config.recipe.Recipe`.
        image_shape: (height, width, channels) of the model input.
        num_classes: classes of the task.
        mean: per-channel mean of raw pixels.
        std: per-channel std of raw pixels.
        stages: build only the first `stages` stages (default: all), as the whole
            recipe defines them: a split model keeps the module boundaries of the
            whole model, and the last built stage keeps its ordinary head unless it
            is the recipe's last (a tuner's trial, `kgreedy.tuning.space`).

    Raises:
        RecipeError: the model cannot be built, loaded or split as the recipe asks,
            or its feature maps are too small for the heads.
    """
    model, designs = recipe.model, head_designs(recipe)
    stages = recipe.num_stages if stages is None else stages
    if not 1 <= stages <= recipe.num_stages:
        raise ValueError(f"`stages` must be between 1 and the recipe's "
                         f"{recipe.num_stages} stages. Received: stages={stages}")
    modules, top = trunk_modules(recipe, image_shape, num_classes, stages)
    if top is not None:
        designs[-1] = top
    modules, designs = modules[:stages], designs[:stages]
    if recipe.split:
        _check_pools(recipe, modules, designs, image_shape)
    return GreedyNet(modules, designs, image_shape, num_classes, mean, std,
                     batch_norm=model.batch_norm, sync_batch_norm=model.sync_batch_norm,
                     objective=objective(recipe), objective_stages=recipe.num_stages,
                     pixel_max=SOURCE_PIXEL_MAX.get(recipe.data.source, PIXEL_MAX),
                     name=recipe.name)


def objective(recipe):
    """The `Objective` of `aux.objective`, with `aux.objective_weights` or InfoPro's
    weights for the recipe's number of modules."""
    weights = recipe.aux.objective_weights
    return objective_for(recipe.aux.objective,
                         None if weights is None else (weights.first, weights.last),
                         recipe.num_stages)


def trunk_modules(recipe, image_shape, num_classes, stages=None):
    """(modules, top): the stages' modules (conv blocks, or the split model's
    pieces) and the split model's own classifier when it is the last head.

    A split model is split whole (its boundaries do not depend on `stages`); conv
    blocks are made for the first `stages` only, since making a layer draws from
    Keras' seed and would change the weights of every later one.
    """
    if recipe.split:
        return split_modules(recipe, image_shape, num_classes)
    model = recipe.model
    return conv_blocks([{"width": b.width, "downsample": b.downsample}
                        for b in model.blocks[:stages]], model.batch_norm,
                       model.sync_batch_norm, model.conv_bias), None


def trunk_shapes(recipe, image_shape, num_classes):
    """(height, width, channels) of each stage's output, for every stage of the
    recipe, without building heads: the tuner checks a trial's pooling against
    them before it builds the trial's net.

    Raises:
        RecipeError: the model cannot be built, loaded or split as the recipe asks.
    """
    modules = trunk_modules(recipe, image_shape, num_classes)[0]
    return [shape[1:] for shape in output_shapes(modules, image_shape)]


def whole_model(recipe, image_shape, num_classes):
    """The model a split recipe names, with its own classifier when
    `aux.last_head` is `model` (`num_classes` logits), else without."""
    model, with_top = recipe.model, recipe.aux.last_head == "model"
    if model.architecture is not None:
        family, depth = architectures.RESIDUAL[model.architecture]
        return resnets.resnet(family, depth, image_shape, model.sync_batch_norm,
                              classes=num_classes if with_top else None)
    if model.keras_application is not None:
        return _application(model.keras_application, image_shape, num_classes, with_top)
    return _load_file(model.keras_file, image_shape)


def split_modules(recipe, image_shape, num_classes):
    """(modules, top): the recipe's model split into modules, and its own
    classifier (a Keras model on the last module's output) when `aux.last_head`
    is `model`, else None."""
    model = recipe.model
    trunk, top = split.trunk_and_top(whole_model(recipe, image_shape, num_classes),
                                     key="model")
    if recipe.aux.last_head == "model":
        _check_top(top, num_classes, model)
    else:
        top = None
    return split.split_trunk(trunk, model.split_at, model.modules, model.balanced_memory,
                             at_key="model.split_at", modules_key="model.modules"), top


def _application(name, image_shape, num_classes, with_top):
    constructor = getattr(keras.applications, name, None)
    if not callable(constructor) or not name[:1].isupper():
        raise RecipeError("model.keras_application", "is not a keras.applications "
                          "constructor (e.g. 'MobileNetV2', 'ResNet50', 'EfficientNetB0')",
                          name)
    kwargs = dict(weights=None, input_shape=tuple(image_shape), include_top=with_top)
    if with_top:
        kwargs.update(classes=num_classes, classifier_activation=None)
    try:
        model = constructor(**kwargs)
    except ValueError as e:
        # keras.applications refuses an input it cannot take (too small, wrong
        # channels) with a ValueError; its first line says which.
        raise RecipeError("model.keras_application", f"keras.applications.{name} "
                          f"cannot be built for {'x'.join(map(str, image_shape))} "
                          f"images: {str(e).strip().splitlines()[0]}", name) from None
    # keras.applications' BN keeps moving statistics with momentum 0.99 or 0.999
    # (MobileNets): after a short greedy stage they are still near their start, and a
    # frozen module keeps them for good. kgreedy's own layers use PyTorch's 0.1
    # (Keras 0.9, `batch_norm_layer`); a model kgreedy builds gets the same.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    return model


def _load_file(path, image_shape):
    if not os.path.isfile(path):
        raise RecipeError("model.keras_file", "no such file", path)
    if not path.endswith(".keras"):
        raise RecipeError("model.keras_file", "must be a .keras file (model.save("
                          "'name.keras'))", path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except (ValueError, TypeError, OSError) as e:
        raise RecipeError("model.keras_file", "Keras cannot load it: "
                          f"{str(e).strip().splitlines()[0]}", path) from None
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) == 1 and tuple(inputs[0].shape[1:]) not in (tuple(image_shape),):
        shape = tuple(inputs[0].shape[1:])
        if len(shape) != 3 or any(a is not None and a != b
                                  for a, b in zip(shape, image_shape)):
            raise RecipeError("model.keras_file", f"the model takes inputs of shape "
                              f"{shape}, the data gives images of "
                              f"{tuple(image_shape)}", path)
    return model


def _check_top(top, num_classes, model):
    problem = split.own_classifier_problem(top, num_classes)
    if problem is None:
        return
    source = ("model.keras_file" if model.keras_file else
              "model.keras_application" if model.keras_application else "model.architecture")
    message = {
        "none": f"'model' needs a classifier of the model's own, and the {source} model "
                "ends in a feature map",
        "outputs": f"'model': the {source} model's classifier has {problem[-1]} outputs, "
                   f"the data {num_classes} classes",
        "softmax": f"'model': the last layer of the {source} model ({problem[-1]!r}) "
                   "applies softmax, and kgreedy trains logits; save it with "
                   "activation=None"}[problem[0]]
    raise RecipeError("aux.last_head", message, "model")


def _check_pools(recipe, modules, designs, image_shape):
    """Refuses a head that pools a module's map to more than the map's side."""
    problem = pool_problem(modules, designs, image_shape)
    if problem is None:
        return
    j, shape, pool = problem
    own = (j - 1 < len(recipe.aux.per_stage)
           and recipe.aux.per_stage[j - 1].pool_size is not None)
    key = f"aux.per_stage[{j - 1}].pool_size" if own else "aux.pool_size"
    raise RecipeError(key, f"module {j} outputs a {shape[1]}x{shape[2]} map, smaller "
                      f"than the head's {pool}x{pool} pool (image size {image_shape[0]})",
                      pool)

"""A tiny greedy net of the digits, briefly trained, for the serving tests."""

import keras
import numpy as np

from kgreedy import data
from kgreedy.config.recipe import recipe_from_dict
from kgreedy.model.from_recipe import from_recipe


def trained_net(recipe_dict, epochs):
    """(recipe, spec, net, eval images): each stage's deployed model fitted `epochs`
    epochs with Adam, so predictions and BN statistics are not a fresh
    initialisation's."""
    keras.utils.set_random_seed(0)
    recipe = recipe_from_dict(recipe_dict)
    spec = data.describe(recipe.data)
    datasets = data.load(recipe.data, spec, batch_size=64)
    spec = datasets.spec
    net = from_recipe(recipe, spec.image_shape, spec.num_classes, spec.mean, spec.std)
    for stage in range(1, net.num_stages + 1):
        model = net.deployed_model(stage)
        model.compile(keras.optimizers.Adam(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(datasets.train, epochs=epochs, verbose=0, shuffle=False)  # data shuffles
    x = np.concatenate([images.numpy() for images, _ in datasets.eval])
    return recipe, spec, net, x

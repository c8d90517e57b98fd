"""Head designs for the Python API: `kgreedy.heads.Conv(k=2, width=128)`.

A design says what auxiliary classifier each stage gets; each function here makes
the `kgreedy.config.designs.HeadDesign` that a recipe's aux.* also give and that
`kgreedy.model.head_layers.make_head` builds a layer from
(docs/DESIGN.md, "The method"). Designs are frozen, checked when made, and need no
TensorFlow: `import kgreedy.heads` stays light.

- `Conv`: the paper's auxiliary problem (k-1 conv3x3-BN-ReLU of constant width,
  average pool to `pool_size`, BN, linear);
- `MlpSr`: Decoupled Greedy Learning's MLP-SR (pool to 1/`reduction` of the side,
  k-1 conv1x1, pool, three hidden dense layers, linear);
- `Linear`: average pool and one linear layer;
- `Vgg`: VGG's own classifier (max-pool, FC-4096 x2 with dropout, linear).

`width="auto"` is the output channels of the stage's module.
"""

from kgreedy.config.designs import HeadDesign

__all__ = ["Conv", "Linear", "MlpSr", "Vgg"]

# CapWords like the classes they were, and like `keras.Input`: a design reads as a
# thing made (`head=kgreedy.heads.Conv(k=2)`), and all four make one type.


def Conv(k=2, width=128, pool_size=2, reduction=None):
    """The paper's auxiliary problem on top of a stage's module.

    Args:
        k: hidden layers of the auxiliary problem, the module included (k-1 conv
            layers in the head).
        width: channels of the head's convs, or "auto" (the module's channels).
        pool_size: the head averages the map to pool_size x pool_size.
        reduction: first average the map to 1/reduction of its side (None: keep it).

    Returns:
        A `HeadDesign` of kind `conv`.

    Raises:
        ValueError: an argument is not a positive integer (width: or "auto").
    """
    return HeadDesign("conv", k, width, pool_size, reduction)


def MlpSr(k=2, width=128, pool_size=2, reduction=None):
    """Decoupled Greedy Learning's MLP-SR head (cheap next to `Conv`).

    Args:
        k: hidden layers of the auxiliary problem, the module included (k-1
            conv1x1 layers).
        width: channels of the conv1x1 layers, or "auto".
        pool_size: side of the pooled map fed to the MLP.
        reduction: the first pool divides the map's side by this (None: 4).

    Returns:
        A `HeadDesign` of kind `mlp_sr`.

    Raises:
        ValueError: an argument is not a positive integer (width: or "auto").
    """
    return HeadDesign("mlp_sr", k, width, pool_size, reduction)


def Linear(pool_size=2):
    """Average pool to pool_size x pool_size and one linear layer (no BN).

    Args:
        pool_size: side of the pooled map.

    Returns:
        A `HeadDesign` of kind `linear`.

    Raises:
        ValueError: `pool_size` is not a positive integer.
    """
    return HeadDesign("linear", pool_size=pool_size)


def Vgg():
    """VGG's classifier: max-pool, flatten, FC-4096 x2 with dropout 0.5, linear.

    Returns:
        A `HeadDesign` of kind `vgg`.
    """
    return HeadDesign("vgg")

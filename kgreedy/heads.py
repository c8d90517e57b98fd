"""Head designs for the Python API: `kgreedy.heads.Conv(k=2, width=128)`.

A design says what auxiliary classifier each stage gets; `kgreedy.split` turns it
into the plain design dictionary that `kgreedy.model.head_layers.make_head` builds a
layer from (docs/DESIGN.md, "The method"). Designs are frozen, checked when made,
and need no TensorFlow: `import kgreedy.heads` stays light.

- `Conv`: the paper's auxiliary problem (k-1 conv3x3-BN-ReLU of constant width,
  average pool to `pool_size`, BN, linear);
- `MlpSr`: Decoupled Greedy Learning's MLP-SR (pool to 1/`reduction` of the side,
  k-1 conv1x1, pool, three hidden dense layers, linear);
- `Linear`: average pool and one linear layer;
- `Vgg`: VGG's own classifier (max-pool, FC-4096 x2 with dropout, linear).

`width="auto"` is the output channels of the stage's module.
"""

import dataclasses
import typing

__all__ = ["Conv", "Linear", "MlpSr", "Vgg"]


def _positive(name, value, optional=False):
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer"
                         + (" or None" if optional else "")
                         + f". Received: {name}={value!r}")


def _width(value):
    if value != "auto":
        try:
            _positive("width", value)
        except ValueError:
            raise ValueError("`width` must be a positive integer or 'auto' (the "
                             f"module's output channels). Received: width={value!r}") \
                from None


@dataclasses.dataclass(frozen=True)
class Conv:
    """The paper's auxiliary problem on top of a stage's module.

    Args:
        k: hidden layers of the auxiliary problem, the module included (k-1 conv
            layers in the head).
        width: channels of the head's convs, or "auto" (the module's channels).
        pool_size: the head averages the map to pool_size x pool_size.
        reduction: first average the map to 1/reduction of its side (None: keep it).
    """

    k: int = 2
    width: typing.Union[int, str] = 128
    pool_size: int = 2
    reduction: typing.Optional[int] = None

    kind: typing.ClassVar[str] = "conv"

    def __post_init__(self):
        _positive("k", self.k)
        _width(self.width)
        _positive("pool_size", self.pool_size)
        _positive("reduction", self.reduction, optional=True)

    def to_design(self):
        """The design dictionary of `kgreedy.model.network.GreedyNet`."""
        return {"kind": self.kind, "k": self.k, "width": self.width,
                "pool_size": self.pool_size, "reduction": self.reduction}


@dataclasses.dataclass(frozen=True)
class MlpSr(Conv):
    """Decoupled Greedy Learning's MLP-SR head (cheap next to `Conv`).

    Args:
        k: hidden layers of the auxiliary problem, the module included (k-1
            conv1x1 layers).
        width: channels of the conv1x1 layers, or "auto".
        pool_size: side of the pooled map fed to the MLP.
        reduction: the first pool divides the map's side by this (None: 4).
    """

    kind: typing.ClassVar[str] = "mlp_sr"


@dataclasses.dataclass(frozen=True)
class Linear:
    """Average pool to pool_size x pool_size and one linear layer (no BN).

    Args:
        pool_size: side of the pooled map.
    """

    pool_size: int = 2

    kind: typing.ClassVar[str] = "linear"

    def __post_init__(self):
        _positive("pool_size", self.pool_size)

    def to_design(self):
        """The design dictionary of `kgreedy.model.network.GreedyNet`."""
        return {"kind": self.kind, "k": None, "width": None,
                "pool_size": self.pool_size, "reduction": None}


@dataclasses.dataclass(frozen=True)
class Vgg:
    """VGG's classifier: max-pool, flatten, FC-4096 x2 with dropout 0.5, linear."""

    kind: typing.ClassVar[str] = "vgg"

    def to_design(self):
        """The design dictionary of `kgreedy.model.network.GreedyNet`."""
        return {"kind": self.kind, "k": None, "width": None, "pool_size": None,
                "reduction": None}


DESIGNS = (Conv, MlpSr, Linear, Vgg)

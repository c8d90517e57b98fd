"""Head designs: what auxiliary classifier a stage gets (`HeadDesign`), and what a
recipe's aux.* keys mean for each stage (`head_designs`).

A `HeadDesign` is the one description of a head: the recipe's aux.* give one per
stage, the Python API's `kgreedy.heads` make them, and
`kgreedy.model.head_layers.make_head` builds the layer from one, so the model is
built without knowing the recipe (`kgreedy.model.from_recipe`). No TensorFlow here.

The tuner's trials draw them too (`kgreedy.tuning.space.design_from`), and
`HeadDesign.to_dict` and `HeadDesign.from_dict` are their JSON form: the designs
kgreedy.tune writes to tuning.json.
"""

import dataclasses
import typing

from kgreedy.base.errors import RecipeError
from kgreedy.config.vocabulary import LAST_HEAD_TYPES

# The fields each kind of head is built from. The others are carried but unused: a
# recipe keeps aux.k and aux.width when aux.head is linear. "model" is a split
# model's own classifier, the layer itself.
HEAD_FIELDS = {"conv": ("k", "width", "pool_size", "reduction"),
               "mlp_sr": ("k", "width", "pool_size", "reduction"),
               "linear": ("pool_size",), "vgg": (), "model": ()}
_OPTIONAL = ("reduction",)  # None: the head layer's own default
# The JSON form's keys, in the recipe's spelling (aux.head, aux.k, ...), and the
# fields they hold, in the order to_dict writes them.
_JSON_KEYS = (("head", "kind"), ("k", "k"), ("width", "width"),
              ("pool_size", "pool_size"), ("reduction", "reduction"))


@dataclasses.dataclass(frozen=True)
class HeadDesign:
    """One stage's head (docs/DESIGN.md, "The method"), checked when made.

    Args:
        kind: `conv` (the paper's auxiliary problem), `mlp_sr` (Decoupled Greedy
            Learning's MLP-SR), `linear` (pool and one linear layer), `vgg` (VGG's
            classifier) or `model` (a split model's own classifier).
        k: hidden layers of the auxiliary problem, the module included (conv,
            mlp_sr: k-1 conv layers in the head).
        width: channels of the head's convs, or "auto" (the module's output
            channels).
        pool_size: the head averages the map to pool_size x pool_size.
        reduction: first average the map to 1/reduction of its side (None: the
            layer's default, conv 1, mlp_sr 4).

    Raises:
        ValueError: an unknown kind, or a field the kind needs is missing or not a
            positive integer (width: or "auto").
    """

    kind: str
    k: typing.Optional[int] = None
    width: typing.Union[int, str, None] = None
    pool_size: typing.Optional[int] = None
    reduction: typing.Optional[int] = None

    def __post_init__(self):
        if self.kind not in LAST_HEAD_TYPES:
            raise ValueError(f"`kind` must be one of {LAST_HEAD_TYPES}. "
                             f"Received: kind={self.kind!r}")
        for name in ("k", "width", "pool_size", "reduction"):
            value = getattr(self, name)
            needed = name in HEAD_FIELDS[self.kind] and name not in _OPTIONAL
            if value is None and not needed:
                continue
            if name == "width" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer"
                                 + (" or 'auto' (the module's output channels)"
                                    if name == "width" else "")
                                 + (" or None" if not needed else "")
                                 + f". Received: {name}={value!r}")

    @property
    def pools(self):
        """Whether the head averages the map to `pool_size` (conv, mlp_sr, linear)."""
        return "pool_size" in HEAD_FIELDS[self.kind]

    def to_dict(self):
        """The design as JSON holds it, in the recipe's spelling: {"head": kind, "k",
        "width", "pool_size", "reduction"}, in that order, a field that is None left
        out (e.g. {"head": "conv", "k": 2, "width": 16, "pool_size": 2})."""
        return {key: getattr(self, field) for key, field in _JSON_KEYS
                if getattr(self, field) is not None}

    @classmethod
    def from_dict(cls, values):
        """The design of a `to_dict` dict; a key left out is None.

        Raises:
            ValueError: `values` is not a dict, has a key other than head, k, width,
                pool_size and reduction, has no head, or makes a design that
                `HeadDesign` refuses.
        """
        keys = dict(_JSON_KEYS)
        if not isinstance(values, dict) or "head" not in values or set(values) - set(keys):
            raise ValueError(f"A head design must be a dict with the key 'head' and "
                             f"optionally {', '.join(map(repr, list(keys)[1:]))}. "
                             f"Received: values={values!r}")
        return cls(**{keys[key]: value for key, value in values.items()})


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
    """Per stage: the head's `HeadDesign` (aux.*, with the stage's aux.per_stage entry
    where one is given; aux.last_head for the last stage).

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

        last = j == recipe.num_stages - 1 and aux.last_head is not None
        designs.append(HeadDesign(aux.last_head if last else pick("head"), pick("k"),
                                  width, pick("pool_size"), aux.reduction))
    return designs

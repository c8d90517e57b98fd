"""Named trunk layouts of the paper's models, as plain specs a recipe selects.

`model.architecture` picks one of these instead of writing `model.blocks` by hand.
A layout is plain data (block widths and downsamplings, BN, conv bias and the
auxiliary defaults that belong to the model); `expand` writes it into a raw recipe
before validation, so the resolved recipe (`recipe.json` of a run) lists every block
and resumes, exports and dry-runs like a hand-written one.

The k=1 models of the paper differ from its k=2/3 models (wider, no BN), so
`paper_cifar10` and `paper_imagenet` choose their variant by `aux.k`.
Where the paper is silent the official code (github.com/eugenium/layerCNN) decides;
each layout's docstring says what was taken from where.
"""

from kgreedy.base.errors import RecipeError


def _blocks(layout):
    """[(width, downsample), ...] -> the JSON form of `model.blocks`."""
    return [{"width": w, "downsample": d} for w, d in layout]


def paper_cifar10(k):
    """The paper's CIFAR-10 models (ICLR'19 preprint Tables 1-2).

    k=1: J=5, M=256, no BN; psi before blocks 2 and 4, each doubling the width (an
    assumption: the paper gives only J and M). k>=2: J=4, 128@32, 128@32, psi,
    256@16, 256@16 with BN (the official code's `--ncnn 4 --feature_size 128
    --down [1]`); auxiliary width 128, doubled to 256 after the downsampling.
    """
    if k == 1:
        return {"blocks": _blocks([(256, "none"), (512, "psi"), (512, "none"),
                                   (1024, "psi"), (1024, "none")]),
                "batch_norm": False, "aux": {"width": 256}}
    return {"blocks": _blocks([(128, "none"), (128, "none"), (256, "psi"), (256, "none")]),
            "batch_norm": True, "aux": {"width": 128}}


def paper_imagenet(k):
    """The paper's ImageNet models (224x224 input, J=8).

    Both apply psi to the input image (block 1 works at 112x112). k=1 (no BN):
    256@112, 256@112, 512@56, 1024@28, 2048@14, 2048@14, 4096@7, 4096@7, psi before
    blocks 3, 4, 5 and 7 (the official `imagenet_single_layer.py`, downsample=[1,2,3,5]).
    k>=2 (BN, M=128): 128@112, 128@112, 256@56, 256@56, 512@28, 512@28, 1024@14,
    1024@14, psi before blocks 3, 5 and 7 (the official `imagenet.py`,
    downsample=[1,3,5]: the paper's "blocks 2, 4, 6" counted from 0). Auxiliary
    width 256 at block 1, doubled at every later downsampling (2048 at 14x14); the
    last head's width, the paper's M~_f, is `aux.last_width`.
    """
    if k == 1:
        return {"blocks": _blocks([(256, "psi"), (256, "none"), (512, "psi"), (1024, "psi"),
                                   (2048, "psi"), (2048, "none"), (4096, "psi"),
                                   (4096, "none")]),
                "batch_norm": False, "aux": {"width": 256}}
    return {"blocks": _blocks([(128, "psi"), (128, "none"), (256, "psi"), (256, "none"),
                               (512, "psi"), (512, "none"), (1024, "psi"), (1024, "none")]),
            "batch_norm": True, "aux": {"width": 256}}


VGG11_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
VGG11_POOLED = (False, True, True, False, True, False, True, False)


def vgg11(k):
    """VGG-11 with BN (configuration "A": 64-M-128-M-256-256-M-512-512-M-512-512-M).

    Eight blocks conv3x3 (with bias, as torchvision's `vgg11_bn`) -> BN -> ReLU, a
    max-pool before blocks 2, 3, 5 and 7; the last stage's head is VGG's own
    classifier (max-pool, FC-4096, FC-4096, FC-classes, dropout 0.5), so the deployed
    network is exactly VGG-11-BN: 132,868,840 parameters at 224x224 and 1000
    classes. The auxiliary heads of stages 1-7 follow the official VGG code: the
    block output averaged to half its side, k-1 conv layers twice as wide as the
    block, pool to 2x2, BN, linear. `k` does not change the trunk.
    """
    del k
    return {"blocks": _blocks([(w, "maxpool" if pooled else "none")
                               for w, pooled in zip(VGG11_WIDTHS, VGG11_POOLED)]),
            "batch_norm": True, "conv_bias": True,
            "aux": {"width": 128, "reduction": 2, "last_head": "vgg",
                    "per_stage": [{"width": 2 * w} for w in VGG11_WIDTHS[:-1]]}}


ARCHITECTURES = {"paper_cifar10": paper_cifar10, "paper_imagenet": paper_imagenet,
                 "vgg11": vgg11}

# Residual networks (He et al. 2016), built whole by kgreedy.model.resnets and split
# into model.modules balanced modules (or at model.split_at): name -> (family, depth).
RESIDUAL = {"resnet20": ("cifar", 20), "resnet32": ("cifar", 32),
            "resnet56": ("cifar", 56), "resnet110": ("cifar", 110),
            "resnet18": ("imagenet", 18), "resnet34": ("imagenet", 34),
            "resnet50": ("imagenet", 50)}
# What a residual architecture sets when the recipe does not: heads as wide as the
# module's output.
RESIDUAL_AUX = {"width": "auto"}


def layout(name, k):
    """The plain spec of architecture `name` for auxiliary depth `k`.

    Returns:
        {"blocks": [{"width", "downsample"}, ...], "batch_norm": bool,
         optionally "conv_bias": bool, "aux": {defaults of aux.* keys}}.

    Raises:
        RecipeError: `name` is not a known architecture.
    """
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise RecipeError("model.architecture", "must be one of "
                          + ", ".join(repr(n) for n in [*ARCHITECTURES, *RESIDUAL]), name)
    return ARCHITECTURES[name](k)


def expand(raw):
    """Writes `model.architecture`'s layout into a raw (JSON) recipe, in place.

    Keys the recipe sets itself win over the layout's defaults (`model.batch_norm`,
    `aux.width`, ...), except `model.blocks`: a recipe that names an architecture
    and also lists blocks must list exactly the architecture's (as a resolved
    `recipe.json` does), or the two would disagree silently.

    Raises:
        RecipeError: unknown architecture, or blocks that differ from it.
    """
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("architecture") is None:
        return raw
    aux = raw.get("aux") if isinstance(raw.get("aux"), dict) else {}
    if model["architecture"] in RESIDUAL:
        if model.get("blocks"):
            raise RecipeError("model.blocks", f"architecture {model['architecture']!r} "
                              "is split into modules (model.modules or model.split_at) "
                              "and has no model.blocks; leave them out", model["blocks"])
        raw["aux"] = {**RESIDUAL_AUX, **aux}
        return raw
    k = aux.get("k", 2) if isinstance(aux.get("k", 2), int) else 2
    spec = layout(model["architecture"], k)
    blocks = model.get("blocks")
    if blocks is None:
        model["blocks"] = spec["blocks"]
    elif _normalised(blocks) != spec["blocks"]:
        raise RecipeError("model.blocks", f"differ from architecture "
                          f"{model['architecture']!r} (k={k}); leave model.blocks out, "
                          "or leave out model.architecture to write your own", blocks)
    model.setdefault("batch_norm", spec["batch_norm"])
    if "conv_bias" in spec:
        model.setdefault("conv_bias", spec["conv_bias"])
    if spec.get("aux"):
        raw["aux"] = {**spec["aux"], **aux}
    return raw


def _normalised(blocks):
    """Blocks as the layout writes them (downsample defaults to none)."""
    if not isinstance(blocks, list):
        return blocks
    return [{"width": b.get("width"), "downsample": b.get("downsample", "none")}
            if isinstance(b, dict) else b for b in blocks]

"""What a module trains on (`aux.objective`): the `Objective` interface and its three
objectives, `make_objective`, and InfoPro's per-module weights.

InfoPro (Wang et al., *Revisiting Locally Supervised Learning*, ICLR 2021) trains
module j on `w_rec(j) * reconstruction + w_task(j) * task`: a decoder rebuilds the image
from the module's output (section 3), and the task is a classifier's cross-entropy or
the supervised contrastive loss of a projection head (Khosla et al., NeurIPS 2020).
The layers and per-example losses are in `kgreedy.model.objective_parts`; `GreedyNet`
makes each module's parts and `GreedyNet.module_losses` runs them.
"""

import dataclasses
import math

from kgreedy.model.objective_parts import (
    TEMPERATURE, LossWeights, ProjectionHead, ReconstructionDecoder, cross_entropy,
    reconstruction_loss, supervised_contrastive_loss)

# (w_rec, w_task) of the first and the last local module in the official code's
# commands (Experiments on CIFAR-SVHN-STL10/comand.sh), ResNet-32 on CIFAR-10 with the
# contrastive loss, by the number of modules K. The defaults are its K=4 row: the run
# issue 26 compares first. The official code has no CIFAR command for the
# cross-entropy task, so `infopro` takes the same defaults.
INFOPRO_RESNET32_CIFAR10 = {2: ((5.0, 1.0), (0.0, 0.0)), 4: ((6.0, 0.0), (1.0, 2.0)),
                            8: ((5.0, 0.0), (0.0, 2.0)), 16: ((5.0, 0.05), (0.2, 0.5))}
FIRST_WEIGHTS, LAST_WEIGHTS = INFOPRO_RESNET32_CIFAR10[4]


def module_weights(num_modules, first=FIRST_WEIGHTS, last=LAST_WEIGHTS):
    """Per-module (w_rec, w_task), each running linearly from `first` (module 1) to
    `last` (module `num_modules`), as InfoPro's `ixx`/`ixy` do; one module gets `last`.

    The official code interpolates over its K-1 local modules and trains the last with
    cross-entropy alone; calling this with K-1 reproduces it, except that its K=2 run
    gives the single local module `first`.

    Returns:
        A tuple of `num_modules` (w_rec, w_task) pairs of floats.

    Raises:
        ValueError: `num_modules` < 1, or a weight is negative.
    """
    if not isinstance(num_modules, int) or num_modules < 1:
        raise ValueError(f"`num_modules` must be an integer >= 1. Received: "
                         f"num_modules={num_modules!r}")
    first, last = tuple(map(float, first)), tuple(map(float, last))
    if len(first) != 2 or len(last) != 2 or min(first + last) < 0:
        raise ValueError(f"`first` and `last` must be (w_rec, w_task) pairs of weights "
                         f">= 0. Received: first={first!r}, last={last!r}")
    if num_modules == 1:
        return (last,)
    ratios = [j / (num_modules - 1) for j in range(num_modules)]
    return tuple(tuple(a * (1 - r) + b * r for a, b in zip(first, last)) for r in ratios)


def _check_stage(stage, num_stages):
    if not 1 <= stage <= num_stages:
        raise ValueError(f"`stage` must be in 1..num_stages. Received: stage={stage!r}, "
                         f"num_stages={num_stages!r}")


class Objective:
    """What a module trains on. A new objective is a subclass (and an entry in
    `OBJECTIVES`).

    Every module keeps its classifier head, and the head always learns from its
    cross-entropy at full weight: the stage's accuracy, the ensemble and per-stage
    exports stay meaningful. `head_gradient` says what share of that gradient reaches
    the module: 1 as in the paper, 0 where the head is an online probe on the
    module's gradient-stopped output that never changes the module, or InfoPro's
    w_task. `make_parts` gives the extra layers a module needs (decoder, projection
    head, loss weights), `losses` its per-example float32 losses by name, with
    `total`, the one minimised (head and parts included).
    """

    name = None
    needs_images = False  # `losses` reads the input images (in [0, 1])

    def head_gradient(self, stage, num_stages):
        """The share of module `stage`'s head's cross-entropy gradient that reaches
        the module (the head itself always gets all of it)."""
        del stage, num_stages
        return 1.0

    def make_parts(self, module_output_shape, image_shape, num_classes, stage, num_stages):
        """The extra layers of module `stage` (1-based) of `num_stages`, by name.

        Args:
            module_output_shape: (B, H, W, C) of the module's output (B may be None).
            image_shape: (H, W, C) of the input image.
            num_classes: classes of the task.
            stage: the module, 1..num_stages.
            num_stages: the number of modules.
        """
        del module_output_shape, image_shape, num_classes
        _check_stage(stage, num_stages)
        return {}

    def losses(self, parts, features, images01, labels, logits, training):
        """Per-example losses, {name: [B] float32}, with `total` among them.

        Args:
            parts: what `make_parts` gave for this module.
            features: the module's output.
            images01: the input images scaled to [0, 1] (None unless `needs_images`).
            labels: [B] integer classes.
            logits: the module's head's logits (on features whose gradient is scaled
                by `head_gradient`).
            training: the layers' training mode.
        """
        raise NotImplementedError

    def get_config(self):
        """The arguments that `make_objective(self.name, **config)` rebuilds it with."""
        return {}

    def describe(self, num_stages):
        """One line on what the modules of a net of `num_stages` train on."""
        del num_stages
        return f"objective: {self.name}, each module's head's cross-entropy"


class CrossEntropy(Objective):
    """The paper's objective: the module's head's cross-entropy alone."""

    name = "cross_entropy"

    def losses(self, parts, features, images01, labels, logits, training):
        del parts, features, images01, training
        ce = cross_entropy(labels, logits)
        return {"cross_entropy": ce, "total": ce}


@dataclasses.dataclass(frozen=True)
class _InfoProBase(Objective):
    first: tuple = FIRST_WEIGHTS
    last: tuple = LAST_WEIGHTS
    decoder_width: int = 12
    needs_images = True

    def __post_init__(self):
        module_weights(2, self.first, self.last)  # checks them now, not at stage 1
        object.__setattr__(self, "first", tuple(map(float, self.first)))
        object.__setattr__(self, "last", tuple(map(float, self.last)))

    def weights(self, stage, num_stages):
        """(w_rec, w_task) of module `stage`."""
        _check_stage(stage, num_stages)
        return module_weights(num_stages, self.first, self.last)[stage - 1]

    def make_parts(self, module_output_shape, image_shape, num_classes, stage, num_stages):
        w_rec, w_task = self.weights(stage, num_stages)
        return {"decoder": ReconstructionDecoder(image_shape, self.decoder_width,
                                                 name=f"stage{stage}_decoder"),
                "weights": LossWeights(w_rec, w_task, name=f"stage{stage}_weights")}

    def get_config(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    task = "cross-entropy"

    def describe(self, num_stages):
        pairs = " ".join("{:.3g}/{:.3g}".format(*self.weights(j, num_stages))
                         for j in range(1, num_stages + 1))
        detached = [j for j in range(1, num_stages + 1)
                    if not self.head_gradient(j, num_stages)]
        return (f"objective: {self.name}, w_rec * reconstruction + w_task * {self.task}; "
                f"w_rec/w_task by module: {pairs}"
                + (f"; the heads of modules {detached[0]}..{detached[-1]} learn on their "
                   "gradient-stopped output" if detached else ""))


@dataclasses.dataclass(frozen=True)
class InfoPro(_InfoProBase):
    """InfoPro with the cross-entropy task: w_rec * reconstruction + w_task * the
    module's head's cross-entropy (Wang et al. 2021, section 3, I(h, y) estimated by a
    classifier).

    The module's gradient is w_rec * the reconstruction's + w_task * the head's
    cross-entropy's (`head_gradient` scales what reaches it); the head learns from
    its cross-entropy at full weight, so a module with w_task 0 (module 1 in
    InfoPro's settings) still has a trained head. The last module's head is the
    deployed classifier: there w_task is at least 1.
    """

    name = "infopro"

    def weights(self, stage, num_stages):
        w_rec, w_task = super().weights(stage, num_stages)
        return (w_rec, max(w_task, 1.0)) if stage == num_stages else (w_rec, w_task)

    def head_gradient(self, stage, num_stages):
        return self.weights(stage, num_stages)[1]

    def losses(self, parts, features, images01, labels, logits, training):
        rec = reconstruction_loss(images01, parts["decoder"](features, training=training))
        ce = cross_entropy(labels, logits)
        return {"reconstruction": rec, "cross_entropy": ce,
                # w_task reaches the module through `head_gradient`, not here.
                "total": parts["weights"].w_rec * rec + ce}


@dataclasses.dataclass(frozen=True)
class InfoProContrast(_InfoProBase):
    """InfoPro with the contrastive task (the paper's default): w_rec * reconstruction
    + w_task * the supervised contrastive loss of a `ProjectionHead`.

    Modules 1..J-1 train without their head: it learns on their gradient-stopped
    output, its cross-entropy added to `total` (it reaches the head only). The last
    module trains its head (the deployed classifier) with cross-entropy too, weight 1,
    so the export is a classifier.

    Negatives of the contrastive loss are the examples of the batch it is given: under
    a tf.distribute strategy, the replica's own batch.
    """

    name = "infopro_contrast"
    task = "contrastive"
    dim: int = 128
    temperature: float = TEMPERATURE

    def head_gradient(self, stage, num_stages):
        return 1.0 if stage == num_stages else 0.0

    def make_parts(self, module_output_shape, image_shape, num_classes, stage, num_stages):
        parts = super().make_parts(module_output_shape, image_shape, num_classes, stage,
                                   num_stages)
        parts["projection"] = ProjectionHead(self.dim, name=f"stage{stage}_projection")
        return parts

    def losses(self, parts, features, images01, labels, logits, training):
        rec = reconstruction_loss(images01, parts["decoder"](features, training=training))
        con = supervised_contrastive_loss(
            parts["projection"](features, training=training), labels, self.temperature)
        ce = cross_entropy(labels, logits)
        return {"reconstruction": rec, "contrastive": con, "cross_entropy": ce,
                "total": parts["weights"](rec, con) + ce}


OBJECTIVES = {cls.name: cls for cls in (CrossEntropy, InfoPro, InfoProContrast)}


def make_objective(name, **kwargs):
    """Builds an objective by name: `cross_entropy`, `infopro` or `infopro_contrast`.

    Raises:
        ValueError: `name` is not an objective, or an argument is not one of its own.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; known objectives: "
                         f"{sorted(OBJECTIVES)}. Received: name={name!r}")
    cls = OBJECTIVES[name]
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"Objective {name!r} takes no arguments {unknown}; it takes "
                         f"{sorted(known)}. Received: "
                         + ", ".join(f"{k}={kwargs[k]!r}" for k in unknown))
    return cls(**kwargs)


def objective_for(objective, weights=None, num_modules=4):
    """The `Objective` of `objective` for a net of `num_modules` modules.

    Args:
        objective: a name of `OBJECTIVES`, or an `Objective` (used as it is).
        weights: for the InfoPro objectives, ((w_rec, w_task) of module 1, (w_rec,
            w_task) of the last module); None: `INFOPRO_RESNET32_CIFAR10`'s row for
            `num_modules`, else its K=4 row.
        num_modules: modules of the net (picks the default weights).

    Raises:
        ValueError: an unknown name, weights that are not two pairs of finite
            numbers >= 0, or weights for an objective that has none.
    """
    if isinstance(objective, Objective):
        if weights is not None:
            raise ValueError("`objective_weights` applies to an objective given by name; "
                             "an Objective carries its own. Received: "
                             f"objective_weights={weights!r}")
        return objective
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {tuple(OBJECTIVES)} or an "
                         f"Objective. Received: objective={objective!r}")
    if objective == "cross_entropy":
        if weights is not None:
            raise ValueError("`objective_weights` only applies to 'infopro' and "
                             f"'infopro_contrast'. Received: objective_weights={weights!r}")
        return make_objective(objective)
    if weights is None:
        weights = INFOPRO_RESNET32_CIFAR10.get(num_modules, (FIRST_WEIGHTS, LAST_WEIGHTS))
    try:
        first, last = (tuple(float(w) for w in pair) for pair in weights)
        ok = len(first) == len(last) == 2 and all(
            math.isfinite(w) and w >= 0 for w in first + last)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("`objective_weights` must be ((w_rec, w_task) of module 1, "
                         "(w_rec, w_task) of the last module), finite and >= 0. "
                         f"Received: objective_weights={weights!r}")
    return make_objective(objective, first=first, last=last)

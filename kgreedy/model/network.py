"""The greedy network: a trunk of modules with one auxiliary head per stage.

Models know nothing of training. `GreedyNet` owns the layers; the engine decides
which are frozen, and `deployed_model` assembles what is exported. `get_config`
and `from_config` rebuild a net without the recipe or the code that made it;
`parameter_table` and `stage_table` count its parameters per stage.
"""

import keras

from kgreedy.config.designs import HeadDesign
from kgreedy.config.vocabulary import EXPORT_HEADS
# For its Keras registration (ZeroPadShortcut): `from_config` rebuilds a recipe's
# ResNet modules in a process that never built one.
from kgreedy.model import resnets  # noqa: F401
from kgreedy.model.head_layers import make_head
from kgreedy.model.layers import Standardize
from kgreedy.model.objectives import CrossEntropy, make_objective
from kgreedy.model.split import layer_span

# Raw pixel value of white when nothing says otherwise: 8-bit images.
PIXEL_MAX = 255.0


class GreedyNet:
    """A trunk of modules (`stage{j}_...`) with one head per stage (`stage{j}_head`).

    Stage j (1-based) is module j with head j on top of modules 1..j-1. A module is
    any Keras layer or model that maps a feature map to a feature map: a plain conv
    block (`kgreedy.model.layers.conv_blocks`), or a piece of a split model
    (`kgreedy.model.split.split_model`). Every layer is built at construction, so
    weights exist before a checkpoint is restored. The arguments are plain values,
    as a keras-hub backbone takes them; `kgreedy.model.from_recipe` builds one from
    a recipe.

    Args:
        modules: per stage, a Keras layer or model, in the order the data passes.
        heads: per stage, a `kgreedy.config.designs.HeadDesign`
            (`kgreedy.model.head_layers.make_head` builds it; width "auto" is the
            module's output channels), or a Keras layer used as the head itself.
        image_shape: (height, width, channels) of the model input.
        num_classes: classes of the task.
        mean: per-channel mean of raw pixels (the `standardize` layer).
        std: per-channel std of raw pixels.
        batch_norm: BN in the heads made from designs.
        sync_batch_norm: BN statistics over all replicas, in those heads.
        objective: what each module trains on, a `kgreedy.model.objectives.Objective`
            (default: `CrossEntropy`). Its extra layers per module (`parts`: decoder,
            projection head) train and are checkpointed with the module; no deployed
            model contains them.
        objective_stages: the modules of the whole network, over which the
            objective's weights run (default: `len(modules)`; a tuner's trial builds
            only the first stages).
        pixel_max: raw pixel value of white; images / pixel_max is the [0, 1] image
            an objective's decoder rebuilds.
        name: prefix of the Keras models this net assembles.
    """

    def __init__(self, modules, heads, image_shape, num_classes, mean, std, *,
                 batch_norm=True, sync_batch_norm=False, objective=None,
                 objective_stages=None, pixel_max=PIXEL_MAX, name="greedy"):
        if len(modules) != len(heads) or not modules:
            raise ValueError("GreedyNet needs one head per module, and at least one "
                             f"module. Received: {len(modules)} modules, {len(heads)} "
                             "heads")
        self.name = name
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.standardize = Standardize(mean, std, name="standardize")
        self.modules = list(modules)
        self.heads, self.stage_shapes = [], []
        shapes = output_shapes(self.modules, self.image_shape)
        for j, (module, head, shape) in enumerate(zip(self.modules, heads, shapes),
                                                  start=1):
            if len(shape) != 4:
                raise ValueError(f"Module {j} ({module.name!r}) outputs shape {shape}, not "
                                 "a feature map (batch, height, width, channels). "
                                 f"Received: modules[{j - 1}]={module.name!r}")
            if isinstance(head, HeadDesign):
                head = make_head(head, num_classes, channels=shape[-1],
                                 batch_norm=batch_norm, sync_batch_norm=sync_batch_norm,
                                 name=f"stage{j}_head")
            elif not isinstance(head, keras.layers.Layer):
                raise ValueError(f"A head is a HeadDesign or a Keras layer. Received: "
                                 f"heads[{j - 1}]={head!r}")
            if not head.built:
                head.build(shape)
            self.heads.append(head)
            self.stage_shapes.append(shape[1:])
        self.pixel_max = float(pixel_max)
        self.objective_stages = objective_stages or self.num_stages
        self.set_objective(objective or CrossEntropy())

    def set_statistics(self, mean, std):
        """Sets the per-channel statistics of the `standardize` layer: a net built
        before its data were read (the command line builds it first, to check it)
        gets them once they are measured. Call it before the first step is traced:
        the layer applies them as constants."""
        self.standardize.mean = [float(m) for m in mean]
        self.standardize.std = [float(s) for s in std]

    def set_objective(self, objective):
        """Makes (and builds) every module's parts for `objective`; they start fresh."""
        self.objective = objective
        self.parts = []
        for j, shape in enumerate(self.stage_shapes, start=1):
            parts = objective.make_parts((None, *shape), self.image_shape,
                                         self.num_classes, j, self.objective_stages)
            for part in parts.values():
                if not part.built:
                    part.build((None, *shape))
            self.parts.append(parts)

    @property
    def num_stages(self):
        return len(self.modules)

    def features(self, images, stop, training=False):
        """Raw images through `standardize` and modules 1..stop."""
        x = self.standardize(images)
        for module in self.modules[:stop]:
            x = module(x, training=training)
        return x

    def stage_logits(self, features, stage, training):
        """Module `stage` and its head on the output of modules 1..stage-1."""
        return self.heads[stage - 1](self.modules[stage - 1](features, training=training),
                                     training=training)

    def module_losses(self, stage, features, labels, images=None, training=True):
        """Module `stage` on `features` (the output of modules 1..stage-1), its head
        and its objective's parts.

        The head reads the module's output with the gradient into the module scaled
        by the objective's `head_gradient` (0: gradient-stopped, an online probe).

        Args:
            stage: 1-based module index.
            features: the module's input.
            labels: [B] integer classes.
            images: the raw input images of the batch (objectives that need them).
            training: the layers' training mode.

        Returns:
            (head logits, the objective's per-example losses by name, module output).
        """
        output = self.modules[stage - 1](features, training=training)
        share = self.objective.head_gradient(stage, self.objective_stages)
        head_input = output
        if share != 1.0:
            # The same values; the gradient into the module scaled by `share` (0:
            # none). The head's own gradient is whole either way.
            frozen = keras.ops.stop_gradient(output)
            head_input = frozen if share == 0.0 else frozen + share * (output - frozen)
        logits = self.heads[stage - 1](head_input, training=training)
        images01 = self.images01(images) if self.objective.needs_images else None
        losses = self.objective.losses(self.parts[stage - 1], output, images01, labels,
                                       logits, training)
        return logits, losses, output

    def images01(self, images):
        """Raw images scaled to [0, 1] by `pixel_max` (clipped), in float32."""
        scaled = keras.ops.cast(images, "float32") / self.pixel_max
        return keras.ops.clip(scaled, 0.0, 1.0)

    def part_weights(self, stage):
        """Trainable weights of module `stage`'s parts."""
        return [w for part in self.parts[stage - 1].values() for w in part.trainable_weights]

    def stage_variables(self, stage):
        """The weights a greedy stage trains: module `stage`, its head and parts."""
        return (self.modules[stage - 1].trainable_weights
                + self.heads[stage - 1].trainable_weights + self.part_weights(stage))

    def set_trainable_stage(self, stage, end_to_end=False):
        """Freezes every module but `stage` (all modules up to it when end_to_end)."""
        for j, (module, head, parts) in enumerate(
                zip(self.modules, self.heads, self.parts), start=1):
            module.trainable = j == stage or (end_to_end and j < stage)
            head.trainable = j == stage
            for part in parts.values():
                part.trainable = j == stage

    def checkpoint_objects(self, stage):
        """What a stage's checkpoint holds: modules, heads and parts 1..stage.

        The key stays "blocks", the name of the trunk's pieces before modules:
        run directories written then still restore. "parts" is there only when the
        objective has parts, so a cross-entropy run's checkpoints are as before.
        """
        objects = {"blocks": self.modules[:stage], "heads": self.heads[:stage]}
        if any(self.parts):
            objects["parts"] = [dict(p) for p in self.parts[:stage]]
        return objects

    def deployed_model(self, stage=None, heads="last"):
        """Keras model of modules 1..stage and head `stage` (default: the last).

        Its input is raw pixels of `image_shape`; its output is logits: of head
        `stage` (`heads="last"`), or the ensemble of heads 1..stage
        (`heads="ensemble"`, see `ensemble_logits`).
        """
        stage = stage or self.num_stages
        inputs = keras.Input(self.image_shape, name="images")
        if heads == "ensemble":
            logits = ensemble_logits(self.all_head_logits(inputs, stage))
            return keras.Model(inputs, logits, name=f"{self.name}_ensemble{stage}")
        if heads != "last":
            raise ValueError(f"`heads` must be one of {EXPORT_HEADS}. Received: heads={heads!r}")
        logits = self.heads[stage - 1](self.features(inputs, stage), training=False)
        return keras.Model(inputs, logits, name=f"{self.name}_stage{stage}")

    def all_head_logits(self, images, stage=None):
        """Logits of heads 1..stage on raw `images`, each on its own module's output
        (one pass through the trunk)."""
        stage = stage or self.num_stages
        x, logits = self.standardize(images), []
        for module, head in zip(self.modules[:stage], self.heads[:stage]):
            x = module(x, training=False)
            logits.append(head(x, training=False))
        return logits

    def backbone(self, stage=None):
        """Keras model of the trunk up to `stage` with every stage's output."""
        stage = stage or self.num_stages
        inputs = keras.Input(self.image_shape, name="images")
        x, outputs = self.standardize(inputs), {}
        for j, module in enumerate(self.modules[:stage], start=1):
            x = module(x, training=False)
            outputs[f"stage{j}"] = x
        return keras.Model(inputs, outputs, name=f"{self.name}_backbone")

    def get_config(self):
        """What `from_config` rebuilds this net from, JSON-serialisable: every module
        and head as Keras serialises it (layers, names, shapes; no weights), the
        input, the task, the standardisation and the objective.

        The rebuilt net is untrained: a checkpoint (`checkpoint_objects`) or copied
        weights make it this one. Its objective's parts are made afresh, as
        `set_objective` makes them. A module or head of the caller's own Keras
        classes needs them registered (`keras.saving.register_keras_serializable`).
        """
        serialize = keras.saving.serialize_keras_object
        return {"modules": [serialize(module) for module in self.modules],
                "heads": [serialize(head) for head in self.heads],
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "mean": list(self.standardize.mean), "std": list(self.standardize.std),
                "objective": {"name": self.objective.name,
                              "config": self.objective.get_config()},
                "objective_stages": self.objective_stages, "pixel_max": self.pixel_max,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        """The untrained net of `get_config`'s config (also once read back from JSON).

        Raises:
            TypeError: Keras cannot rebuild a module or head (a class it does not
                know).
            ValueError: the objective is not one of
                `kgreedy.model.objectives.OBJECTIVES`.
        """
        config = dict(config)
        objective = config.pop("objective")
        for key in ("modules", "heads"):
            config[key] = [keras.saving.deserialize_keras_object(layer)
                           for layer in config[key]]
        return cls(**config, objective=make_objective(objective["name"],
                                                      **objective["config"]))


def output_shapes(modules, image_shape):
    """Each module's output shape (batch dimension first) on images of `image_shape`,
    chained; modules not built yet are built on their input shape."""
    shape, shapes = (None, *image_shape), []
    for module in modules:
        if not module.built:
            module.build(shape)
        shape = tuple(module.compute_output_shape(shape))
        shapes.append(shape)
    return shapes


def pool_problem(modules, heads, image_shape):
    """(stage, output shape, pool size) of the first head design that pools its
    module's map to more than the map's side, or None when all fit.

    Heads given as layers are the caller's; VGG heads have no adaptive pool.
    """
    for j, (shape, head) in enumerate(zip(output_shapes(modules, image_shape), heads),
                                      start=1):
        if not isinstance(head, HeadDesign) or not head.pools or len(shape) != 4:
            continue
        pool = head.pool_size
        sides = [d for d in shape[1:3] if d is not None]
        if sides and min(sides) < pool:
            return j, shape, pool
    return None


def ensemble_weights(num_heads):
    """The paper's weights 2^j of heads j = 1..num_heads, normalised to sum to 1."""
    raw = [2.0 ** j for j in range(1, num_heads + 1)]
    return [w / sum(raw) for w in raw]


def ensemble_logits(logits):
    """The paper's head ensemble Z = sum_j 2^j z_j (section 4), over heads' logits.

    The weights are normalised to sum to 1: the class ranking is the paper's, and the
    softmax of Z stays on the heads' own scale instead of being sharpened by a
    factor of about 2^(J+1).
    """
    weights = ensemble_weights(len(logits))
    return sum(w * z for w, z in zip(weights, logits))


def count_params(weights):
    """Number of scalars in a list of weights."""
    total = 0
    for w in weights:
        n = 1
        for d in w.shape:
            n *= int(d)
        total += n
    return total


def parameter_table(net):
    """Per stage: output shape, trainable and frozen parameter counts.

    `trainable` counts what stage j's optimizer updates (module j, head j and its
    objective's parts, BN moving statistics excluded); `frozen` counts every weight of modules 1..j-1;
    `deployed` counts every weight of the model exported after that stage.
    """
    rows = []
    for j in range(1, net.num_stages + 1):
        prefix = [w for m in net.modules[:j - 1] for w in m.weights]
        own = net.modules[j - 1].weights + net.heads[j - 1].weights
        rows.append({
            "stage": j,
            "output_shape": list(net.stage_shapes[j - 1]),
            "trainable_params": count_params(net.stage_variables(j)),
            "frozen_params": count_params(prefix),
            "deployed_params": count_params(prefix + own),
        })
    return rows


def stage_table(net):
    """The per-stage table of `SplitNet.summary` and `kgreedy.train --dry-run`, as
    lines."""
    rows = parameter_table(net)
    lines = [f"{'stage':>5}  {'output':>12}  {'trainable':>12}  {'frozen':>12}  "
             f"{'deployed':>12}  module"]
    for r, module in zip(rows, net.modules):
        first, last, count = layer_span(module)
        span = module.name if count <= 1 else f"{first} .. {last} ({count} layers)"
        lines.append(f"{r['stage']:>5}  {'x'.join(map(str, r['output_shape'])):>12}  "
                     f"{r['trainable_params']:>12,}  {r['frozen_params']:>12,}  "
                     f"{r['deployed_params']:>12,}  {span}")
    trainable = count_params([w for layer in (*net.modules, net.heads[-1])
                              for w in layer.trainable_weights])
    lines.append(f"deployed model (trunk + stage {len(rows)} head): "
                 f"{rows[-1]['deployed_params']:,} parameters ({trainable:,} trainable, "
                 "the rest BN moving statistics)")
    return lines

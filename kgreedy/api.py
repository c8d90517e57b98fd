"""The Python API in Keras' idiom: `kgreedy.split`, `kgreedy.fit`, `SplitNet.export`.

    net = kgreedy.split(backbone, at=["res1", "res2"], num_classes=10,
                        head=kgreedy.heads.Conv(k=2, width=64))
    history = kgreedy.fit(net, train_ds, validation_data=eval_ds, epochs_per_stage=10)
    net.export("exports/mymodel/1")

`split` cuts a Keras model into modules (`kgreedy.model.split`) and gives each a
head; `fit` trains them greedily through the command line's engine
(`kgreedy.training.controller.GreedyTrainer`: the same stage loop, epoch driver,
records and checkpoints) on the caller's tf.data pipelines; `export` writes the
SavedModel of `kgreedy.serving.export`, the command line's serving contract.
Reference: docs/python-api.md. Arguments are checked before any work, with Keras'
errors (`ValueError: ... Received: x=...`).
"""

import numbers
import os

import keras
import numpy as np

from kgreedy import fitting
from kgreedy.base.errors import KgreedyError, format_value
from kgreedy.config.designs import HeadDesign
from kgreedy.config.vocabulary import EXPORT_HEADS
from kgreedy.data.external import external_spec
from kgreedy.heads import Conv
from kgreedy.model import split as splitting
from kgreedy.model.network import GreedyNet, pool_problem, stage_table
from kgreedy.model.objectives import objective_for
from kgreedy.serving.early_exit import plan_exits
from kgreedy.serving.export import export_saved_model

__all__ = ["SplitNet", "fit", "split"]


class SplitNet(GreedyNet):
    """A `GreedyNet` made by `kgreedy.split`: modules, heads, and what its export needs.

    Everything of `GreedyNet` (`modules`, `heads`, `stage_shapes`,
    `deployed_model(stage, heads)`, `backbone()`), plus `summary` and `export`.

    Args:
        modules: per stage, a Keras layer or model (see `GreedyNet`).
        heads: per stage, a `kgreedy.config.designs.HeadDesign` or a Keras layer.
        image_shape: (height, width, channels) of the input.
        num_classes: classes of the task.
        mean: per-channel mean subtracted inside the net.
        std: per-channel standard deviation divided by inside the net.
        class_names: one name per class for the export (default: the class ids).
        **kwargs: `GreedyNet`'s keyword arguments (`batch_norm`, `name`, ...).
    """

    def __init__(self, modules, heads, image_shape, num_classes, mean, std, *,
                 class_names=None, **kwargs):
        super().__init__(modules, heads, image_shape, num_classes, mean, std, **kwargs)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.class_names = class_names

    def get_config(self):
        """`GreedyNet.get_config` and the class names; `SplitNet.from_config`
        rebuilds the untrained net."""
        return {**super().get_config(), "class_names": self.class_names}

    @property
    def spec(self):
        """The `DatasetSpec` an export and a run directory's dataset.json hold."""
        return external_spec(self.image_shape, self.num_classes, self.mean, self.std,
                             self.class_names)

    def summary(self, print_fn=None):
        """Prints one row per stage: output shape, trainable, frozen and deployed
        parameters, and the layers of its module."""
        for line in stage_table(self):
            (print_fn or print)(line)

    def export(self, path, heads="last", stage=None, calibration_data=None,
               max_accuracy_drop=0.5):
        """Exports the deployed model as a TF Serving version directory: the command
        line's SavedModel, written whole or not at all, never over an existing one.

        Args:
            path: the version directory, `MODEL_DIR/VERSION` with VERSION a
                positive integer (TF Serving's layout), e.g. "exports/mymodel/1".
            heads: "last" serves the stage's head; "ensemble" the paper's weighted
                ensemble of heads 1..stage; "early_exit" heads 1..stage as exits.
            stage: the deepest stage exported (default: the last).
            calibration_data: with "early_exit", (images, labels) batches not
                trained on, where the thresholds are fitted (even-numbered
                examples) and scored (odd-numbered): `plan_exits`.
            max_accuracy_drop: with "early_exit", the points of accuracy the exits
                may lose against the last head.

        Returns:
            The absolute path of the version directory.

        Raises:
            ValueError: a bad path, heads, stage or calibration_data; a version exists.
        """
        path = os.fspath(path)
        root, version = os.path.split(os.path.normpath(path))
        if not (version.isascii() and version.isdigit() and int(version) > 0 and root):
            raise ValueError("`path` must be a version directory MODEL_DIR/VERSION with "
                             "VERSION a positive integer, as TF Serving reads it, e.g. "
                             f"'exports/mymodel/1'. Received: path={path!r}")
        if heads not in EXPORT_HEADS:
            raise ValueError(f"`heads` must be one of {EXPORT_HEADS}. Received: "
                             f"heads={heads!r}")
        if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int)
                                  or not 1 <= stage <= self.num_stages):
            raise ValueError(f"`stage` must be between 1 and {self.num_stages}. "
                             f"Received: stage={stage!r}")
        if os.path.exists(path):
            raise ValueError("`path` exists already; exported versions are never "
                             f"overwritten: pick the next version. Received: path={path!r}")
        if (heads == "early_exit") != (calibration_data is not None):
            raise ValueError("`calibration_data` is needed with heads='early_exit', and "
                             f"only then. Received: heads={heads!r}, calibration_data="
                             f"{type(calibration_data).__name__}")
        try:  # a version written meanwhile by someone else; too few heads or examples
            plan = (plan_exits(self, calibration_data, stage, max_accuracy_drop)
                    if heads == "early_exit" else None)
            return export_saved_model(self, self.spec, root, stage=stage, heads=heads,
                                      version=int(version), exit_plan=plan)
        except KgreedyError as e:
            raise ValueError(f"{e}. Received: path={path!r}") from None


# ------------------------------------------------------------------ split ----

def split(model, at=None, *, modules=None, balanced_memory=False, num_classes,
          head=None, last_head=None, mean=None, std=None, class_names=None,
          input_shape=None, batch_norm_momentum=None, objective="cross_entropy",
          objective_weights=None, pixel_max=255.0, name=None):
    """Splits a Keras model into the modules of a greedy net, each with a head.

    Stage j trains module j and its head on the output of modules 1..j-1. The
    modules share the model's own layers: after `kgreedy.fit` the model holds the
    trained weights.

    Args:
        model: a functional or Sequential `keras.Model` with one fixed-size image
            input (a classifier's own top is cut off first, see `last_head`); or a
            list of Keras layers or models, used as the modules as they are.
        at: names of the layers to split after, in the order the data passes them:
            len(at) + 1 modules. A split point must be a layer that every path goes
            through and no skip connection spans.
        modules: instead of `at`, the number of modules of balanced depth.
        balanced_memory: with `modules`, balance the activation size each module
            writes instead of its conv and dense layers.
        num_classes: classes of the task.
        head: a design of `kgreedy.heads` for every stage (default
            `kgreedy.heads.Conv()`), or a list with one design or ready Keras layer
            per stage.
        last_head: the last stage's head, the deployed classifier: a design, a
            Keras layer, or "model" for the model's own classifier (its top).
        mean: per-channel mean (or one number) of the raw pixels, subtracted inside
            the net, so the export takes raw pixels. Default 0: no normalisation,
            the pipeline's values go in as they are.
        std: per-channel standard deviation (or one number); default 1.
        class_names: one name per class, answered by the export (default: the ids).
        input_shape: (height, width, channels), for a list of modules whose first
            one does not know its input.
        batch_norm_momentum: sets the momentum of every BatchNormalization layer of
            the net (the model's own layers, and the heads'); None keeps each
            layer's. Keras' default 0.99 needs about 100 steps per stage to settle
            its moving statistics; 0.9 (kgreedy's own layers, PyTorch's 0.1) about
            10. `kgreedy.fit` warns about a stage too short for a layer's momentum.
        objective: what each module trains on, as the recipe's `aux.objective`:
            "cross_entropy" (its head's), "infopro" (reconstruction + its head's
            cross-entropy) or "infopro_contrast" (reconstruction + supervised
            contrastive loss; the head learns on the gradient-stopped output), or a
            `kgreedy.model.objectives.Objective`. Its decoders and projection heads
            are never part of an export.
        objective_weights: ((w_rec, w_task) of module 1, (w_rec, w_task) of the last
            module) for the InfoPro objectives; default: InfoPro's ResNet-32 CIFAR-10
            weights for this number of modules (docs/your-network.md).
        pixel_max: the raw pixel value of white: the InfoPro decoders rebuild
            images / pixel_max, clipped to [0, 1] (255 for 8-bit images, 1.0 for
            images already in [0, 1]).
        name: prefix of the Keras models the net assembles (default: the model's).

    Returns:
        A `SplitNet`.

    Raises:
        ValueError: an argument is wrong, or the model cannot be split there.
    """
    _check_count("num_classes", num_classes, low=2)
    if isinstance(model, (list, tuple)):
        for key, value in (("at", at), ("modules", modules)):
            if value is not None:
                raise ValueError(f"`{key}` splits a model; a list of modules is used as "
                                 f"it is. Received: {key}={value!r}")
        parts, top = _module_list(model), None
        image_shape = _image_shape(input_shape, parts[0], "input_shape")
    elif isinstance(model, keras.Model):
        image_shape = _image_shape(input_shape, model, "model")
        parts, top = _split_model(model, at, modules, balanced_memory, num_classes,
                                  last_head == "model")
    else:
        raise ValueError("`model` must be a keras.Model or a list of Keras layers. "
                         f"Received: model={format_value(model)}")
    heads = _heads(head, last_head, top, len(parts))
    channels = image_shape[-1]
    mean = _statistic("mean", 0.0 if mean is None else mean, channels)
    std = _statistic("std", 1.0 if std is None else std, channels)
    if any(s <= 0 for s in std):
        raise ValueError(f"`std` must be > 0. Received: std={std!r}")
    if class_names is not None and (isinstance(class_names, str)
                                    or len(class_names) != num_classes):
        raise ValueError(f"`class_names` needs one name per class ({num_classes}). "
                         f"Received: class_names={format_value(class_names)}")
    _check_pools(parts, heads, image_shape)
    if batch_norm_momentum is not None and (
            isinstance(batch_norm_momentum, bool)
            or not isinstance(batch_norm_momentum, numbers.Real)
            or not 0.0 <= batch_norm_momentum < 1.0):  # NaN fails too
        raise ValueError("`batch_norm_momentum` must be a number in [0, 1), e.g. 0.9, "
                         "or None to keep each layer's. Received: "
                         f"batch_norm_momentum={format_value(batch_norm_momentum)}")
    objective = objective_for(objective, objective_weights, len(parts))
    if isinstance(pixel_max, bool) or not isinstance(pixel_max, numbers.Real) \
            or not 0 < pixel_max < float("inf"):
        raise ValueError("`pixel_max` must be a number > 0, the raw value of white. "
                         f"Received: pixel_max={format_value(pixel_max)}")
    net = SplitNet(parts, heads, image_shape, num_classes, mean, std,
                   class_names=None if class_names is None else list(class_names),
                   objective=objective, pixel_max=pixel_max,
                   name=name or getattr(model, "name", None) or "greedy")
    if batch_norm_momentum is not None:
        # The modules are the model's own layers: the model keeps the new momentum.
        for layer in (*net.modules, *net.heads):
            for bn in fitting.batch_norms(layer):
                bn.momentum = float(batch_norm_momentum)
    return net


def _check_count(key, value, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{key}` must be an integer >= {low}. Received: {key}={value!r}")


def _module_list(model):
    if not model:
        raise ValueError("`model` as a list needs at least one module. Received: model=[]")
    for i, part in enumerate(model):
        if not isinstance(part, keras.layers.Layer):
            raise ValueError(f"Every module must be a Keras layer or model. Received: "
                             f"model[{i}]={format_value(part)}")
    if len({id(p) for p in model}) != len(model):
        raise ValueError("A module appears twice in `model`; each stage trains its own. "
                         f"Received: model={[p.name for p in model]}")
    return list(model)


def _image_shape(given, model, key):
    if given is None:
        inputs = _inputs(model)
        if len(inputs) != 1:
            raise ValueError(f"`{key}` needs one image input"
                             + ("; pass input_shape=(height, width, channels)"
                                if key == "input_shape" else "")
                             + f". Received: {len(inputs)} inputs")
        given = tuple(inputs[0].shape[1:])
    shape = tuple(given)
    if len(shape) != 3 or not all(isinstance(d, numbers.Integral) and d > 0 for d in shape):
        raise ValueError("The net needs a fixed image shape (height, width, channels): "
                         "build the model on keras.Input((H, W, C)) or pass "
                         f"input_shape. Received: input shape {shape}")
    return tuple(int(d) for d in shape)


def _inputs(model):
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):  # a layer, or an unbuilt Sequential
        return []


def _keras_error(error):
    """A `SplitError` (`KgreedyError`) in Keras' words."""
    text = f"`{error.path}`: {error.message}" if error.path else error.message
    if error.received is not KgreedyError._MISSING:
        text += f". Received: {error.path}={format_value(error.received)}"
    return ValueError(text)


def _split_model(model, at, modules, balanced_memory, num_classes, own_top):
    if (at is None) == (modules is None):
        raise ValueError("Pass exactly one of `at` (layer names to split after) and "
                         f"`modules` (a number of balanced modules). Received: at={at!r}, "
                         f"modules={modules!r}")
    if modules is not None:
        _check_count("modules", modules)
    elif isinstance(at, str) or not all(isinstance(n, str) for n in at):
        raise ValueError(f"`at` must be a list of layer names. Received: at={at!r}")
    try:
        trunk, top = splitting.trunk_and_top(model, key="model")
        if own_top:
            _check_top(top, num_classes)
        return splitting.split_trunk(trunk, at, modules, balanced_memory, at_key="at",
                                     modules_key="modules"), top
    except splitting.SplitError as e:
        raise _keras_error(e) from None


def _check_top(top, num_classes):
    problem = splitting.own_classifier_problem(top, num_classes)
    if problem is None:
        return
    raise ValueError({
        "none": "`last_head='model'` keeps the model's own classifier, and the model "
                "ends in a feature map. Received: last_head='model'",
        "outputs": f"The model's classifier has {problem[-1]} outputs and the task "
                   f"{num_classes} classes. Received: num_classes={num_classes}",
        "softmax": f"The model's last layer ({problem[-1]!r}) applies softmax, and "
                   "kgreedy trains logits: build it with activation=None. "
                   "Received: last_head='model'"}[problem[0]])


def _design(value, key):
    if isinstance(value, keras.layers.Layer) or (isinstance(value, HeadDesign)
                                                 and value.kind != "model"):
        return value
    raise ValueError(f"`{key}` must be a design of kgreedy.heads (Conv, MlpSr, Linear, "
                     f"Vgg) or a Keras layer. Received: {key}={format_value(value)}")


def _heads(head, last_head, top, count):
    head = Conv() if head is None else head
    if isinstance(head, (list, tuple)):
        if len(head) != count:
            raise ValueError(f"`head` as a list needs one head per stage ({count}). "
                             f"Received: {len(head)} heads")
        heads = [_design(h, f"head[{i}]") for i, h in enumerate(head)]
    elif isinstance(head, keras.layers.Layer):
        raise ValueError("A ready Keras layer is the head of one stage: pass a list "
                         f"with one head per stage. Received: head={format_value(head)}")
    else:
        heads = [_design(head, "head")] * count
    if last_head == "model":
        heads[-1] = top
    elif last_head is not None:
        heads[-1] = _design(last_head, "last_head")
    layers = [h for h in heads if not isinstance(h, HeadDesign)]
    if len({id(h) for h in layers}) != len(layers):
        raise ValueError("A head layer appears for two stages; each stage needs its own. "
                         f"Received: heads {[h.name for h in layers]}")
    return heads


def _statistic(key, value, channels):
    values = [value] if isinstance(value, numbers.Real) else np.ravel(value).tolist()
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(np.isfinite(v) for v in values):
        raise ValueError(f"`{key}` needs one finite number, or one per channel "
                         f"({channels}). Received: {key}={format_value(value)}")
    return [float(v) for v in values]


def _check_pools(parts, heads, image_shape):
    """Refuses a head that pools a module's map to more than the map's side."""
    problem = pool_problem(parts, heads, image_shape)
    if problem is not None:
        j, shape, pool = problem
        raise ValueError(f"Module {j} outputs a {shape[1]}x{shape[2]} map, smaller "
                         f"than its head's {pool}x{pool} pool. Received: "
                         f"pool_size={pool} for stage {j}")


def fit(net, train_ds, validation_data=None, *, epochs_per_stage=10, optimizer=None,
        mode="greedy", steps_per_epoch=None, callbacks=(), run_dir=None, resume=False,
        verbose=1, objective=None, objective_weights=None, memory_budget=None):
    """Trains a `SplitNet` greedily, stage by stage (or end to end, or decoupled),
    like `Model.fit`.

    Stage j trains module j and head j with a new optimizer, modules 1..j-1 frozen
    (BN in inference mode). The engine is the command line's: the same stage loop,
    epoch driver, records and checkpoints (docs/DESIGN.md, "The training engine").

    Args:
        net: what `kgreedy.split` returned.
        train_ds: a `tf.data.Dataset` of (images, labels) batches, labels integer
            class ids; each epoch iterates it afresh (its own shuffling applies).
        validation_data: the same for evaluation after every epoch, or None.
        epochs_per_stage: epochs of each stage (end to end, decoupled: of the whole
            fit).
        optimizer: `optimizer(stage)` returns a new Keras optimizer for the stage
            (its learning rate, schedule and weight decay apply). Default:
            `keras.optimizers.SGD(0.1, momentum=0.9)`.
        mode: "greedy", "end_to_end" (every module with the last head, the
            baseline) or "decoupled" (every module at once, each on its own head's
            loss, no gradient between modules: DGL; `optimizer(j)` is then called
            once per module j, and the logs add `module{j}_accuracy`,
            `val_module{j}_accuracy` and the losses).
        steps_per_epoch: batches per epoch; required when tf.data does not know
            the dataset's length (a `repeat()`ed or filtered one). Default: one
            pass over `train_ds`.
        callbacks: `keras.callbacks.Callback`s: `set_model` gets each stage's
            deployed model (with the stage's `optimizer`); `on_train_begin/end` once
            per fit, `on_epoch_begin/end` with logs `loss`, `accuracy`, `val_loss`,
            `val_accuracy`, `learning_rate`, `stage` (batch hooks are not called).
            `model.stop_training` ends the stage after that epoch.
        run_dir: a directory for the command line's run files (metrics.jsonl,
            summary.json, TensorBoard, checkpoints every epoch) plus fit.json; it
            must be new or empty unless `resume`.
        resume: continue the fit in `run_dir` from its last checkpoint (same net,
            mode, epochs, steps and batch size), mid-epoch included.
        verbose: 0 silent, 1 a progress bar, 2 one line per epoch.
        objective: what each module trains on, as `split`'s `objective` (which it
            replaces, with fresh decoders and projection heads); None keeps the net's.
        objective_weights: as `split`'s, for the objective given (or the net's).
        memory_budget: the memory the fit's stages may use, `"12GB"`, `"512MB"`
            (units of 1024) or `"auto"` (what the device has free), as the command
            line's `train.memory_budget`: a fit whose largest stage needs more
            raises `ValueError` before any work, naming the modes that fit. None
            (default): not checked.

    Returns:
        A `keras.callbacks.History` (`kgreedy.training.keras_hooks.StageHistory`):
        `history.history[key]` over every epoch this call ran,
        `history.stages[j][key]` for stage j, and `history.summary` (per-stage
        entries and the final scores, as summary.json).

    Raises:
        ValueError: a bad argument, found before any work.
        kgreedy.base.errors.NonFiniteLoss: a loss was NaN or infinite.

    Warns:
        UserWarning: a stage has fewer steps than a BatchNormalization layer of it
            needs to settle its moving statistics, 1/(1 - momentum)
            (`kgreedy.fitting.check_batch_norm`); see `split`'s
            `batch_norm_momentum`.
    """
    if not isinstance(net, SplitNet):
        raise ValueError("`net` must be what kgreedy.split returned. "
                         f"Received: net={format_value(net)}")
    callbacks = [] if callbacks is None else callbacks
    if objective is not None or objective_weights is not None:
        objective = objective_for(net.objective.name if objective is None else objective,
                                  objective_weights, net.num_stages)
    return fitting.fit_net(net, train_ds, validation_data, epochs_per_stage=epochs_per_stage,
                           optimizer=optimizer, mode=mode, steps_per_epoch=steps_per_epoch,
                           callbacks=callbacks, run_dir=run_dir, resume=resume,
                           verbose=verbose, objective=objective,
                           memory_budget=memory_budget)

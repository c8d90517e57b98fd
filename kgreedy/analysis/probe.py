"""Layer-wise linear separability of a trained trunk (Belilovsky et al., ICML 2019, §4.2).

For each module j of a trained run's trunk (a block, or a module of a split model),
a logistic regression is fitted on module j's output, average-pooled to 2x2
(adaptively, as the heads pool) and standardised, and its accuracy is measured on a
sample of the train split and of the eval split. The paper uses this to show that
greedy training makes every layer progressively more linearly separable. Both
samples are taken without augmentation: the eval-time view of each split, the same
pixels evaluation sees.

The data are the run's own (recipe.json's `data` section), or those of a
DATA.json given as `data` (`--data`): a recipe or a recipe's data section alone,
whose images must have the shape and classes of the run's net. A `kgreedy.fit` run
records no data source (its data were the caller's tf.data pipelines), so it is
probed only with `data` (`read_data`, `probe_run`).

Writes RUN_DIR/probes.json (the figures, next to each stage's head accuracy from
summary.json) and RUN_DIR/probes.png (accuracy against depth), both atomically.
"""

import dataclasses
import os
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

# TensorFlow (through kgreedy.data and kgreedy.training.rundir) is imported where
# it is needed, so --help and argument errors answer in a second.
from kgreedy.analysis import report
from kgreedy.base.errors import KgreedyError
from kgreedy.base.files import read_json, write_json
from kgreedy.config.recipe import DataConfig, TrainConfig, recipe_from_dict
from kgreedy.config.schema import to_plain

POOL = 2          # the heads' default pool side; features per module: 4 x channels
MAX_ITER = 1000   # lbfgs iterations; digits and CIFAR samples converge well before
# A data section alone is validated as the data of a recipe with this placeholder
# trunk: the same keys, types, ranges and checks across keys as kgreedy.train's.
_PLACEHOLDER = {"name": "probe_data", "model": {"blocks": [{"width": 1}]}}


def read_data(data):
    """The data to probe on, given as `probe_run`'s `data` (`--data DATA.json`).

    DATA.json is read strictly, as `kgreedy.train` reads a recipe: a JSON object
    with a "model" or "data" key is a recipe, validated whole, whose `data` section,
    `seed` (the digits split, a folder's held-out fraction) and eval batch size are
    used; any other object is a recipe's data section alone (the keys of a recipe's
    `data`, checked the same way, errors naming `data.<key>`), with seed 0 and eval
    batches of 128, a recipe's defaults. A `DataConfig` is checked and used as a
    data section alone.

    Returns:
        (`DataConfig`, seed, eval batch size).

    Raises:
        KgreedyError: the file is missing or not JSON, or a key is unknown, of the
            wrong type or out of range.
    """
    default = TrainConfig()
    if isinstance(data, DataConfig):
        raw = to_plain(dataclasses.asdict(data))
    elif isinstance(data, (str, os.PathLike)):
        raw = read_json(data, "data", kind="data file")
        if isinstance(raw, dict) and ("model" in raw or "data" in raw):
            recipe = recipe_from_dict(raw)
            return (recipe.data, recipe.seed,
                    recipe.train.eval_batch_size or recipe.train.batch_size)
        if not isinstance(raw, dict):
            raise KgreedyError("data", "must hold a JSON object: a recipe, or a "
                               "recipe's data section", str(data))
    else:
        raise KgreedyError("data", "must be the path of a JSON file (a recipe, or a "
                           "recipe's data section) or a DataConfig", data)
    return (recipe_from_dict({**_PLACEHOLDER, "data": raw}).data, 0,
            default.eval_batch_size or default.batch_size)


def net_input(run, fit):
    """(image shape, classes, file) of a run's net, read without TensorFlow: from
    net.json for a `kgreedy.fit` run, else from dataset.json, which a recipe's net
    is built from. None when the file is missing or lacks them: `load_trained`
    then says what is wrong with the run."""
    path = run.net if fit else run.dataset
    if not os.path.isfile(path):
        return None
    saved = run.read_json(path)
    try:
        return (tuple(int(n) for n in saved["image_shape"]), int(saved["num_classes"]),
                path)
    except (KeyError, TypeError, ValueError):
        return None


def check_data(config, expected, data):
    """The `DatasetSpec` of `config` (`data.describe`: no pixel read), checked
    against the net's input (`net_input`).

    Raises:
        KgreedyError: the data's image shape or number of classes is not the net's
            (`data` is what names them to the user), or the data cannot be found.
    """
    from kgreedy import data as data_room

    spec = data_room.describe(config)
    if expected is not None:
        shape, classes, path = expected
        if tuple(spec.image_shape) != shape or spec.num_classes != classes:
            raise KgreedyError(
                "data", f"gives {_shape(spec.image_shape)} images of {spec.num_classes} "
                f"classes, but the run's net takes {_shape(shape)} images of {classes} "
                f"classes ({path}); set data.image_size and data.channels to match, or "
                "give data of the net's task", _named(data))
    return spec


def _named(data):
    return str(data) if isinstance(data, (str, os.PathLike)) else data


def sample(datasets, split, count, seed):
    """Up to `count` examples of `split` as eval sees them, in batches.

    The examples go through the eval-time view (no augmentation). For digits and
    image folders they are a uniform draw of the split (`Datasets.sample`), so a
    sample is not just the first classes of a folder stored in class order; a TFDS
    split (shuffled by TFDS when prepared) is shuffled through the recipe's
    `data.shuffle_buffer`.

    Args:
        datasets: `data.Datasets` of the run.
        split: `datasets.train_split` or `datasets.eval_split`.
        count: the most examples to take.
        seed: the draw's seed.

    Returns:
        A `tf.data.Dataset` of (images float32 [B, H, W, C], labels [B]).
    """
    return datasets.sample(split, count, seed)


def block_features(net, stage, batches):
    """Every module's output for a sample, pooled to 2x2 and flattened.

    The images stream through: only the pooled features are kept, so a sample of
    large images needs no more memory than its features.

    Args:
        net: a trained `GreedyNet`.
        stage: modules 1..stage are run.
        batches: (raw images, labels) batches, as `sample` gives.

    Returns:
        ({module j: float32 [n, features]}, labels int [n]).
    """
    import tensorflow as tf

    from kgreedy.model.head_layers import average_pool

    backbone = net.backbone(stage)
    pools = {}
    for j in range(1, stage + 1):
        h, w = net.stage_shapes[j - 1][:2]
        # A map smaller than 2x2 cannot be pooled to it: it is taken whole.
        pools[j] = average_pool((min(POOL, h), min(POOL, w)), name=f"probe_pool{j}")

    @tf.function(reduce_retracing=True)
    def forward(x):
        # A resize/crop view loses the static size that the backbone's input needs.
        outputs = backbone(tf.ensure_shape(x, (None, *net.image_shape)), training=False)
        return {j: tf.reshape(tf.cast(pools[j](outputs[f"stage{j}"]), tf.float32),
                              (tf.shape(x)[0], -1))
                for j in pools}

    chunks, labels = {j: [] for j in pools}, []
    for images, y in batches:
        for j, value in forward(images).items():
            chunks[j].append(value.numpy())
        labels.append(y.numpy())
    return {j: np.concatenate(parts) for j, parts in chunks.items()}, np.concatenate(labels)


def fit_probe(train_x, train_y, eval_x, eval_y, seed):
    """Fits a standardised multinomial logistic regression on the train features.

    Returns:
        (train accuracy, eval accuracy, converged: bool).
    """
    # lbfgs fits one softmax over all classes (multinomial) in scikit-learn >= 1.5.
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(max_iter=MAX_ITER, random_state=seed))
    # One BLAS thread: the matrices are small, and on a busy 2-core machine two
    # threads made lbfgs 50x slower (27 s against 0.4 s for 5,000 x 64 CIFAR
    # features), each waiting for the other to be scheduled.
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        # Non-convergence is recorded in probes.json instead of a warning per module.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train_x, train_y)
    converged = bool(np.all(model[-1].n_iter_ < MAX_ITER))
    return (float(model.score(train_x, train_y)), float(model.score(eval_x, eval_y)),
            converged)


def probe_run(run_dir, max_train=5000, max_eval=2000, stage=None, seed=0, log=print,
              data=None):
    """Measures the linear separability of every module of a run's trunk (its blocks,
    or the modules of a split model); writes the results.

    Each entry of probes.json's "blocks" (the key kept from before modules) is one
    module, numbered by its "block" key; "unit" says what the trunk's pieces are
    ("block" or "module"; a `kgreedy.fit` run's trunk is modules).

    `data` replaces the data a recipe run records rather than being refused: a run
    is probed where it is read, and its recorded data may not be there (an image
    folder or TFDS data_dir moved, a run copied to another machine), or another
    split of the same task may be wanted. Only the net's input is bound to the run,
    and it is checked: the data's image shape and classes must be the net's. The
    net keeps its own standardisation; probes.json records the data section used.

    Args:
        run_dir: a run directory written by `kgreedy.train`, or by `kgreedy.fit`
            (which needs `data`).
        max_train: the most train examples to fit the probes on.
        max_eval: the most eval examples to measure them on.
        stage: probe modules 1..stage (default: every module the newest checkpoint
            holds; an end-to-end run's checkpoint holds all).
        seed: seeds the samples and the logistic regression.
        log: prints progress lines.
        data: the data to probe on instead of the run's own: the path of a recipe
            or of a recipe's data section alone, or a `DataConfig` (`read_data`).
            Required for a `kgreedy.fit` run.

    Returns:
        The dict written to RUN_DIR/probes.json.

    Raises:
        KgreedyError: not a run directory, a `kgreedy.fit` run without `data`, bad
            `data` or data whose image shape or classes are not the net's (before
            the net or any image is loaded), `stage` out of range, or a sample with
            fewer than two classes to fit on.
    """
    from kgreedy.training import rundir

    for flag, value in (("max_train", max_train), ("max_eval", max_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KgreedyError(flag, "must be a positive integer", value)
    run = rundir.RunDir(run_dir)
    settings = rundir.fit_settings(run_dir)
    if settings is not None and data is None:
        raise KgreedyError("run_dir", "is a kgreedy.fit run: it records no data source "
                           "to probe on (the data were the caller's tf.data pipelines); "
                           "give the data with --data DATA.json, a recipe or a recipe's "
                           "data section (probe_run's data=)", run_dir)
    given = None if data is None else read_data(data)
    described = None if given is None else check_data(
        given[0], net_input(run, settings is not None), data)

    from kgreedy import data as data_room

    recipe, spec, net, available = rundir.load_trained(run_dir)
    unit = trunk_unit(recipe)
    if stage is None:
        stage = available
    if not 1 <= stage <= available:
        raise KgreedyError("stage", f"must be between 1 and {available} (the "
                           f"{unit}s the newest checkpoint holds)", stage)
    summary = run.read_json(run.summary) if os.path.isfile(run.summary) else {}
    heads = report.head_accuracies(summary)

    if given is None:
        config, data_seed = recipe.data, recipe.seed
        train_batch = recipe.train.batch_size
        batch = recipe.train.eval_batch_size or recipe.train.batch_size
    else:
        # No train batch is drawn (1: any split is large enough); the pipelines
        # yield raw pixels, so the net's statistics spare measuring the data's.
        (config, data_seed, batch), train_batch = given, 1
        spec = dataclasses.replace(described, mean=spec.mean, std=spec.std)
    log(f"probing {unit}s 1..{stage} of {run.root}: features of up to {max_train} train "
        f"and {max_eval} eval examples"
        + ("" if given is None else f" of {config.source} data from "
           + (str(data) if isinstance(data, (str, os.PathLike)) else "a DataConfig")))
    start = time.perf_counter()
    datasets = data_room.load(config, spec, batch_size=train_batch, eval_batch_size=batch,
                              seed=data_seed)
    try:
        train_f, train_y = block_features(
            net, stage, sample(datasets, datasets.train_split, max_train, seed))
        if len(np.unique(train_y)) < 2:
            raise KgreedyError("max_train", "the train sample holds a single class; "
                               "take more examples", max_train)
        eval_f, eval_y = block_features(
            net, stage, sample(datasets, datasets.eval_split, max_eval, seed))
    finally:
        datasets.close()
    log(f"  {len(train_y)} train and {len(eval_y)} eval examples through the trunk in "
        f"{time.perf_counter() - start:.1f}s")

    blocks = []
    for j in range(1, stage + 1):
        began = time.perf_counter()
        train_acc, eval_acc, converged = fit_probe(train_f[j], train_y, eval_f[j],
                                                   eval_y, seed)
        entry = {"block": j, "output_shape": list(net.stage_shapes[j - 1]),
                 "features": int(train_f[j].shape[1]),
                 "probe_train_accuracy": train_acc, "probe_eval_accuracy": eval_acc,
                 "head_val_accuracy": heads.get(j), "converged": converged,
                 "seconds": time.perf_counter() - began}
        blocks.append(entry)
        head = "-" if heads.get(j) is None else f"{heads[j]:.4f}"
        log(f"  {unit} {j}/{stage}: {_shape(entry['output_shape'])}, {entry['features']} "
            f"features: probe train acc {train_acc:.4f} eval acc {eval_acc:.4f} | "
            f"head val acc {head} | {entry['seconds']:.1f}s"
            + ("" if converged else " (not converged)"))

    result = {"run": run.root, "recipe": None if recipe is None else recipe.name,
              "mode": settings["mode"] if recipe is None else recipe.train.mode,
              "data": None if given is None else to_plain(dataclasses.asdict(config)),
              "stage": stage, "seed": seed, "train_examples": int(len(train_y)),
              "eval_examples": int(len(eval_y)), "pooled_to": [POOL, POOL],
              "max_iter": MAX_ITER, "unit": unit, "blocks": blocks,
              "ensemble_val_accuracy": report.ensemble_accuracy(summary)}
    report.save_png(report.depth_figure(summary, result), run.probes_plot)
    write_json(run.probes, result)
    return result


def trunk_unit(recipe):
    """What a recipe's trunk is made of, in words: "module" for a split model (and
    for a `kgreedy.fit` run, `recipe` None), "block" for `model.blocks`."""
    return "module" if recipe is None or recipe.split else "block"


def _shape(shape):
    return "x".join(map(str, shape))


def print_table(result, log=print):
    """The per-module results as a table."""
    log(f"{result.get('unit', 'block'):>6}  {'output':>10}  {'features':>8}  "
        f"{'probe train':>11}  {'probe eval':>10}  {'head val':>8}")
    for b in result["blocks"]:
        head = b["head_val_accuracy"]
        log(f"{b['block']:>6}  {_shape(b['output_shape']):>10}  {b['features']:>8}  "
            f"{b['probe_train_accuracy']:>11.4f}  {b['probe_eval_accuracy']:>10.4f}  "
            f"{'-' if head is None else format(head, '.4f'):>8}")
    if result.get("ensemble_val_accuracy") is not None:
        log(f"ensemble of heads: val acc {result['ensemble_val_accuracy']:.4f}")

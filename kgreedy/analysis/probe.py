"""Layer-wise linear separability of a trained trunk (Belilovsky et al., ICML 2019, §4.2).

For each module j of a trained run's trunk (a block, or a module of a split model),
a logistic regression is fitted on module j's output, average-pooled to 2x2
(adaptively, as the heads pool) and standardised, and its accuracy is measured on a
sample of the train split and of the eval split. The paper uses this to show that
greedy training makes every layer progressively more linearly separable. Both
samples are taken without augmentation: the eval-time view of each split, the same
pixels evaluation sees.

Writes RUN_DIR/probes.json (the figures, next to each stage's head accuracy from
summary.json) and RUN_DIR/probes.png (accuracy against depth), both atomically.
"""

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
from kgreedy.base.files import write_json

POOL = 2          # the heads' default pool side; features per module: 4 x channels
MAX_ITER = 1000   # lbfgs iterations; digits and CIFAR samples converge well before


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


def probe_run(run_dir, max_train=5000, max_eval=2000, stage=None, seed=0, log=print):
    """Measures the linear separability of every module of a run's trunk (its blocks,
    or the modules of a split model); writes the results.

    Each entry of probes.json's "blocks" (the key kept from before modules) is one
    module, numbered by its "block" key; "unit" says what the trunk's pieces are
    ("block" or "module").

    Args:
        run_dir: a run directory written by `kgreedy.train`.
        max_train: the most train examples to fit the probes on.
        max_eval: the most eval examples to measure them on.
        stage: probe modules 1..stage (default: every module the newest checkpoint
            holds; an end-to-end run's checkpoint holds all).
        seed: seeds the samples and the logistic regression.
        log: prints progress lines.

    Returns:
        The dict written to RUN_DIR/probes.json.

    Raises:
        KgreedyError: not a run directory, `stage` out of range, or a sample with
            fewer than two classes to fit on.
    """
    from kgreedy import data
    from kgreedy.training import rundir

    for flag, value in (("max_train", max_train), ("max_eval", max_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KgreedyError(flag, "must be a positive integer", value)
    if rundir.fit_settings(run_dir) is not None:
        raise KgreedyError("run_dir", "is a kgreedy.fit run: it records no data source "
                           "to probe on (the data were the caller's tf.data pipelines); "
                           "export it with python -m kgreedy.export, or train with "
                           "python -m kgreedy.train to probe", run_dir)
    recipe, spec, net, available = rundir.load_trained(run_dir)
    unit = trunk_unit(recipe)
    if stage is None:
        stage = available
    if not 1 <= stage <= available:
        raise KgreedyError("stage", f"must be between 1 and {available} (the "
                           f"{unit}s the newest checkpoint holds)", stage)
    run = rundir.RunDir(run_dir)
    summary = run.read_json(run.summary) if os.path.isfile(run.summary) else {}
    heads = report.head_accuracies(summary)

    log(f"probing {unit}s 1..{stage} of {run.root}: features of up to {max_train} train "
        f"and {max_eval} eval examples")
    start = time.perf_counter()
    batch = recipe.train.eval_batch_size or recipe.train.batch_size
    datasets = data.load(recipe.data, spec, batch_size=recipe.train.batch_size,
                         eval_batch_size=batch, seed=recipe.seed)
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

    result = {"run": run.root, "recipe": recipe.name, "mode": recipe.train.mode,
              "stage": stage, "seed": seed, "train_examples": int(len(train_y)),
              "eval_examples": int(len(eval_y)), "pooled_to": [POOL, POOL],
              "max_iter": MAX_ITER, "unit": unit, "blocks": blocks,
              "ensemble_val_accuracy": report.ensemble_accuracy(summary)}
    report.save_png(report.depth_figure(summary, result), run.probes_plot)
    write_json(run.probes, result)
    return result


def trunk_unit(recipe):
    """What a recipe's trunk is made of, in words: "module" for a split model,
    "block" for `model.blocks`."""
    return "module" if recipe.split else "block"


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

"""Early exits: the deployed network run module by module, each example leaving at
the first head that is confident enough (docs/serving.md, "Early exits").

After module j, head j scores the examples still running. An example whose
confidence (the maximum softmax probability of head j's logits) is at least
threshold j leaves with head j's logits; the others go on to module j+1 as a
smaller batch, gathered per example, so an example that has left never pays for a
deeper module. The last head answers every example still running.

A threshold of 1 or more turns its exit off. A float32 softmax reaches exactly 1.0
on confident inputs, and "at least 1.0" would let those leave; with the exits off,
the answers are the last head's, bit for bit. A threshold of 0 sends every example
out at head 1.

The graph is TensorFlow ops only (`tf.cond`, `tf.gather`, `tf.scatter_nd`),
so a SavedModel built on it needs neither Keras nor kgreedy to serve.

`plan_exits` calibrates the thresholds on the evaluation split
(`kgreedy.serving.calibration`). So that the figures it reports are not those of
the examples the thresholds were fitted to, it fits them on the even-numbered
evaluation examples and reports accuracy and compute on the odd-numbered ones.
"""

import tensorflow as tf

from kgreedy.base.errors import KgreedyError
from kgreedy.model.ensemble import head_predictions
from kgreedy.model.flops import exit_flops
from kgreedy.serving.calibration import calibrate, evaluate


def check_thresholds(thresholds, num_stages):
    """The thresholds as a list of `num_stages` floats in [0, 1].

    Raises:
        KgreedyError: not one number per stage, or one outside [0, 1] (NaN included).
    """
    try:
        values = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise KgreedyError("thresholds", f"must be {num_stages} numbers, one per stage",
                           thresholds) from None
    if len(values) != num_stages or any(isinstance(t, bool) for t in thresholds):
        raise KgreedyError("thresholds", f"must be {num_stages} numbers, one per stage",
                           thresholds)
    if not all(0.0 <= t <= 1.0 for t in values):  # NaN fails both comparisons
        raise KgreedyError("thresholds", "each must be between 0 and 1", thresholds)
    return values


def confidence(logits):
    """Each example's maximum softmax probability (float32)."""
    return tf.reduce_max(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), axis=-1)


def early_exit_logits(net, images, thresholds, stage=None):
    """Logits and exit stage of each example, modules 1..`stage` run with early exits.

    Args:
        net: a `GreedyNet`.
        images: raw pixels [batch, H, W, C] of the net's `image_shape`.
        thresholds: float32 [stage] (a tensor or a list): exit j's threshold.
        stage: the deepest module and head (default: the last).

    Returns:
        (logits float32 [batch, classes], exit_stage int64 [batch]), exit_stage
        1-based; for each example, the logits of the head it left at.
    """
    stage = stage or net.num_stages
    thresholds = tf.convert_to_tensor(thresholds, tf.float32)
    classes = net.num_classes
    x = net.standardize(images)
    rows = tf.range(tf.shape(x, out_type=tf.int64)[0])

    def nothing():
        return (tf.zeros([0, classes], tf.float32), tf.zeros([0], tf.int64),
                tf.zeros([0], tf.int64))

    def from_module(j, x, rows):
        # Modules j..stage on the examples still running; (logits, exit stages, rows
        # of the input batch) of every one of them, in any order.
        features = net.modules[j - 1](x, training=False)
        logits = tf.cast(net.heads[j - 1](features, training=False), tf.float32)
        if j == stage:
            return logits, tf.fill(tf.shape(rows), tf.constant(j, tf.int64)), rows
        leave = tf.logical_and(confidence(logits) >= thresholds[j - 1],
                               thresholds[j - 1] < 1.0)
        # Positions by tf.where and tf.gather: fewer ops than tf.boolean_mask, which
        # counts at batch 1, where each op's overhead outweighs its arithmetic.
        out, on = tf.where(leave)[:, 0], tf.where(tf.logical_not(leave))[:, 0]
        rest, rest_rows = tf.gather(features, on), tf.gather(rows, on)
        # TF 2.21's CPU conv fails on a batch of 0: skip the deeper modules then.
        deeper = tf.cond(tf.size(rest_rows) > 0,
                         lambda: from_module(j + 1, rest, rest_rows), nothing)
        left = tf.gather(rows, out)
        return (tf.concat([tf.gather(logits, out), deeper[0]], 0),
                tf.concat([tf.fill(tf.shape(left), tf.constant(j, tf.int64)), deeper[1]], 0),
                tf.concat([left, deeper[2]], 0))

    logits, stages, order = tf.cond(tf.size(rows) > 0,
                                    lambda: from_module(1, x, rows), nothing)
    # Back into the request's order.
    count = tf.shape(rows, out_type=tf.int64)
    index = order[:, None]
    return (tf.scatter_nd(index, logits, tf.concat([count, [classes]], 0)),
            tf.scatter_nd(index, stages, count))


def plan_exits(net, dataset, stage=None, max_accuracy_drop=0.5):
    """The thresholds to export, and what they give, for summary.json.

    Fitted (`kgreedy.serving.calibration.calibrate`) on the even-numbered examples
    of `dataset` (the evaluation split), within `max_accuracy_drop` percentage
    points of the last head there; scored on the odd-numbered ones.

    Returns:
        A dict: `thresholds` (one per head; the last is 1, unused),
        `max_accuracy_drop`, the `full_mflops` and each head's `exit_mflops`, the
        `calibration` and `held_out` figures (examples, accuracy, the last head's
        accuracy, mean MFLOPs per image, the share leaving at each head) and the
        accuracy-compute `curve` on the held-out examples, one point per setting on
        the calibration front.
    """
    stage = stage or net.num_stages
    if stage < 2:
        raise KgreedyError("export.heads", "'early_exit' needs at least 2 stages: one "
                           f"head has nothing to exit early to; received stage {stage}",
                           "early_exit")
    confidences, classes, labels = head_predictions(net, dataset, stage)
    correct = classes[:, :-1] == labels[:, None]  # the ensemble's column left out
    if len(confidences) < 2:
        raise KgreedyError("export.heads", "'early_exit' needs at least 2 evaluation "
                           "examples (one to fit the thresholds, one to score them)",
                           len(confidences))
    costs = [flops / 1e6 for flops in exit_flops(net, stage)]
    fit, held = slice(0, None, 2), slice(1, None, 2)
    chosen, last, curve = calibrate(confidences[fit], correct[fit], costs,
                                    max_accuracy_drop / 100)

    def figures(setting, last_setting, rows):
        return {"examples": int(len(confidences[rows])),
                "accuracy": setting.accuracy, "last_head_accuracy": last_setting.accuracy,
                "mean_mflops": setting.mean_cost, "exits": list(setting.exits)}

    def held_out(setting):
        return evaluate(confidences[held], correct[held], costs, setting.thresholds)

    points = []
    for setting in curve:
        scored = held_out(setting)
        points.append({"thresholds": list(setting.thresholds), "accuracy": scored.accuracy,
                       "mean_mflops": scored.mean_cost})
    return {"thresholds": [*chosen.thresholds, 1.0],
            "max_accuracy_drop": float(max_accuracy_drop),
            "full_mflops": costs[-1], "exit_mflops": costs,
            "calibration": figures(chosen, last, fit),
            "held_out": figures(held_out(chosen), held_out(last), held),
            "curve": points}


def describe_plan(plan):
    """The line a run and `kgreedy.export` print for `plan_exits`'s result: the
    thresholds and what they give on the held-out examples."""
    held = plan["held_out"]
    return (f"early exits at {', '.join(f'{t:.3g}' for t in plan['thresholds'][:-1])}: "
            f"accuracy {held['accuracy']:.4f} against the last head's "
            f"{held['last_head_accuracy']:.4f}, {held['mean_mflops']:.3g} of "
            f"{plan['full_mflops']:.3g} MFLOPs per image on {held['examples']} "
            "held-out eval examples")

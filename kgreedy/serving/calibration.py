"""Calibration of early-exit thresholds (issue 29, in progress): the thresholds
with the least mean compute per image whose accuracy is at most `max_drop` below
the last head's, on examples the thresholds are picked on.

The search sees, for every example and head, the head's confidence (its maximum
softmax probability) and whether its answer is right; and each head's cumulative
cost (the MFLOPs of modules 1..j and head j, or any unit). An example leaves at the
first head j < K whose confidence is at least threshold j, as
`kgreedy.serving.early_exit` serves it; a threshold of 1 turns exit j off. The
candidates for threshold j are 1 and the quantiles of head j's confidences. With few
heads every combination is tried; with many, one threshold at a time is improved
until none improves (coordinate descent, from every exit off).

A setting qualifies when its accuracy loss plus one standard error of that loss
(over the examples, each losing 1, 0 or -1 against the last head) is at most
`max_drop`: thresholds fitted to the bare loss follow the noise of the examples they
are fitted on (on CIFAR-10, a fitted loss of 0.48 points was 0.82 on the other half
of the test set), and the standard error shrinks as the examples grow.

Pure NumPy: it runs on the predictions, not the network.
"""

import dataclasses
import itertools

import numpy as np

from kgreedy.base.errors import KgreedyError

QUANTILES = 40  # candidates per threshold, besides 1 (exit off)
EXHAUSTIVE_LIMIT = 200_000  # combinations tried one by one at most


@dataclasses.dataclass(frozen=True)
class Setting:
    """One choice of thresholds and what it gives on the calibration examples."""

    thresholds: tuple
    accuracy: float
    mean_cost: float
    exits: tuple  # the share of examples leaving at each head
    drop_bound: float  # accuracy lost against the last head, plus one standard error


def exits_at(confidences, thresholds):
    """Each example's exit head, 0-based: the first j < K-1 with confidence at least
    threshold j (a threshold of 1 or more is off), else K-1."""
    heads = confidences.shape[1]
    exit_head = np.full(confidences.shape[0], heads - 1)
    for j in reversed(range(heads - 1)):  # the first qualifying head wins
        if thresholds[j] < 1.0:
            exit_head = np.where(confidences[:, j] >= thresholds[j], j, exit_head)
    return exit_head


def evaluate(confidences, correct, costs, thresholds):
    """The `Setting` of `thresholds` on these examples."""
    exit_head = exits_at(confidences, thresholds)
    rows = np.arange(len(exit_head))
    heads = confidences.shape[1]
    shares = np.bincount(exit_head, minlength=heads) / max(len(exit_head), 1)
    lost = correct[:, -1].astype(float) - correct[rows, exit_head]
    return Setting(tuple(float(t) for t in thresholds),
                   float(correct[rows, exit_head].mean()),
                   float(np.asarray(costs, float)[exit_head].mean()),
                   tuple(float(s) for s in shares),
                   float(lost.mean() + lost.std() / np.sqrt(len(lost))))


def _check(confidences, correct, costs, max_drop):
    confidences, correct = np.asarray(confidences, float), np.asarray(correct, bool)
    if confidences.ndim != 2 or confidences.shape[0] == 0 or confidences.shape[1] < 2:
        raise KgreedyError("confidences", "must be [examples, heads] with at least one "
                           "example and two heads", confidences.shape)
    if correct.shape != confidences.shape:
        raise KgreedyError("correct", f"must have the confidences' shape "
                           f"{confidences.shape}", correct.shape)
    if not np.isfinite(confidences).all():
        raise KgreedyError("confidences", "must be finite", "NaN or infinity")
    costs = np.asarray(costs, float)
    if costs.shape != (confidences.shape[1],) or not (np.diff(costs) >= 0).all() \
            or not (costs > 0).all():
        raise KgreedyError("costs", "must be one positive, non-decreasing cumulative cost "
                           "per head", costs.tolist())
    if not 0.0 <= max_drop <= 1.0:  # NaN fails too
        raise KgreedyError("max_drop", "must be between 0 and 1 (a fraction of accuracy)",
                           max_drop)
    return confidences, correct, costs


def calibrate(confidences, correct, costs, max_drop=0.005):
    """The cheapest thresholds whose accuracy loss against the last head, plus one
    standard error, is within `max_drop`.

    Args:
        confidences: [examples, heads] each head's maximum softmax probability.
        correct: [examples, heads] whether each head's answer is right.
        costs: [heads] the cumulative cost of answering at each head.
        max_drop: the accuracy the exits may lose against the last head, as a
            fraction (0.005 is half a point).

    Returns:
        (chosen, last, curve): the chosen `Setting`; the last head's (every exit
        off); and the settings tried that no other beats in both accuracy and cost,
        by cost.

    Raises:
        KgreedyError: the inputs do not fit together, or `max_drop` is out of range.
    """
    confidences, correct, costs = _check(confidences, correct, costs, max_drop)
    heads = confidences.shape[1]
    candidates = [np.unique(np.concatenate([
        np.quantile(confidences[:, j], np.linspace(0, 1, QUANTILES, endpoint=False),
                    method="lower"),
        [1.0]])) for j in range(heads - 1)]
    last = evaluate(confidences, correct, costs, [1.0] * (heads - 1))
    bound = max_drop + 1e-12
    tried = {}

    def score(thresholds):
        key = tuple(thresholds)
        if key not in tried:
            tried[key] = evaluate(confidences, correct, costs, key)
        return tried[key]

    def better(a, b):  # qualifying, cheaper; then more accurate
        return (a.drop_bound <= bound, -a.mean_cost, a.accuracy) > \
            (b.drop_bound <= bound, -b.mean_cost, b.accuracy)

    best = last
    if np.prod([len(c) for c in candidates], dtype=float) <= EXHAUSTIVE_LIMIT:
        for thresholds in itertools.product(*candidates):
            if better(score(thresholds), best):
                best = score(thresholds)
    else:
        current, improved = [1.0] * (heads - 1), True
        while improved:
            improved = False
            for j in range(heads - 1):
                for t in candidates[j]:
                    trial = [*current[:j], float(t), *current[j + 1:]]
                    if better(score(trial), best):
                        best, current, improved = score(trial), trial, True
    return best, last, pareto(tried.values())


def pareto(settings):
    """The settings no other beats in both accuracy and mean cost, by cost."""
    front, top = [], -1.0
    for s in sorted(settings, key=lambda s: (s.mean_cost, -s.accuracy)):
        if s.accuracy > top:
            front.append(s)
            top = s.accuracy
    return front

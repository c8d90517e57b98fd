"""kgreedy.serving.calibration: thresholds picked on predictions whose best answer is
known by construction."""

import numpy as np
import pytest

from kgreedy.base.errors import KgreedyError
from kgreedy.serving import calibration
from kgreedy.serving.calibration import calibrate, exits_at, pareto

COSTS = [1.0, 2.0, 4.0]


def made_up():
    """1,000 examples, 3 heads. Head 1 is right on the first 600 (confidence 0.95)
    and wrong on the rest (0.5); head 2 right on the first 800 (0.9), wrong on the
    rest (0.4); head 3 right on all (0.8)."""
    n = np.arange(1000)
    confidences = np.stack([np.where(n < 600, 0.95, 0.5), np.where(n < 800, 0.9, 0.4),
                            np.full(1000, 0.8)], axis=1)
    correct = np.stack([n < 600, n < 800, np.ones(1000, bool)], axis=1)
    return confidences, correct


@pytest.mark.parametrize("exhaustive", [True, False])
def test_no_loss_allowed_sends_each_example_to_its_first_right_head(exhaustive, monkeypatch):
    if not exhaustive:
        monkeypatch.setattr(calibration, "EXHAUSTIVE_LIMIT", 0)  # coordinate descent
    chosen, last, curve = calibrate(*made_up(), COSTS, max_drop=0.0)
    assert (last.accuracy, last.mean_cost, last.exits) == (1.0, 4.0, (0.0, 0.0, 1.0))
    assert last.thresholds == (1.0, 1.0)
    assert chosen.accuracy == 1.0
    assert chosen.mean_cost == pytest.approx(0.6 * 1 + 0.2 * 2 + 0.2 * 4)
    assert chosen.exits == pytest.approx((0.6, 0.2, 0.2))
    assert chosen.thresholds == (0.95, 0.9)  # observed confidences, not interpolations
    # The last head is as accurate as the chosen setting and dearer: off the curve.
    assert chosen in curve and last not in curve


def test_an_allowed_drop_and_its_standard_error_buy_compute():
    # Sending head 3's 200 examples out at head 2 (all wrong there) loses 0.2, and
    # one standard error of that loss more: 0.4 / sqrt(1000).
    bound = 0.2 + 0.4 / np.sqrt(1000)
    chosen, _, _ = calibrate(*made_up(), COSTS, max_drop=bound + 0.001)
    assert chosen.accuracy == pytest.approx(0.8)
    assert chosen.drop_bound == pytest.approx(bound)
    assert chosen.mean_cost == pytest.approx(0.6 * 1 + 0.4 * 2)
    # The bare loss is not enough: the lossless setting, no cheaper, is kept.
    chosen, _, _ = calibrate(*made_up(), COSTS, max_drop=bound - 0.001)
    assert chosen.accuracy == 1.0 and chosen.mean_cost == pytest.approx(1.8)
    assert chosen.drop_bound == 0.0


def test_the_curve_is_cheaper_and_less_accurate_to_the_left():
    _, _, curve = calibrate(*made_up(), COSTS, max_drop=0.0)
    costs = [s.mean_cost for s in curve]
    accuracies = [s.accuracy for s in curve]
    assert costs == sorted(costs) and accuracies == sorted(accuracies)
    assert len(set(accuracies)) == len(accuracies) >= 3
    assert pareto(curve) == curve


def test_a_threshold_of_one_is_off_even_at_full_confidence():
    confidences = np.array([[1.0, 1.0, 0.3], [0.2, 1.0, 0.3]])
    assert exits_at(confidences, [1.0, 1.0]).tolist() == [2, 2]
    assert exits_at(confidences, [0.5, 1.0]).tolist() == [0, 2]
    assert exits_at(confidences, [0.5, 0.0]).tolist() == [0, 1]
    assert exits_at(confidences, [0.0, 0.0]).tolist() == [0, 0]


@pytest.mark.parametrize("change, argument", [
    (lambda c, r, k, d: (c[:, :1], r[:, :1], k[:1], d), "confidences"),
    (lambda c, r, k, d: (c, r[:10], k, d), "correct"),
    (lambda c, r, k, d: (np.where(c > 0.9, np.nan, c), r, k, d), "confidences"),
    (lambda c, r, k, d: (c, r, [4.0, 2.0, 1.0], d), "costs"),
    (lambda c, r, k, d: (c, r, [1.0, 2.0], d), "costs"),
    (lambda c, r, k, d: (c, r, k, float("nan")), "max_drop"),
    (lambda c, r, k, d: (c, r, k, -0.1), "max_drop"),
])
def test_inputs_that_do_not_fit_are_refused_in_one_line(change, argument):
    confidences, correct = made_up()
    with pytest.raises(KgreedyError, match=argument) as info:
        calibrate(*change(confidences, correct, np.array(COSTS), 0.005))
    assert "\n" not in str(info.value)

"""fastfair.metrics against hand-computed values (seed 0124 bias; K = 2, 4, 8; uniform and 75/25 targets)."""
import math

import numpy as np
import pytest
import torch

from fastfair.metrics import (
    KL_EPSILON, bias, binary_delta, class_frequencies, fairness_discrepancy, frequency_metrics, joint_labels,
    kl_divergence, mean_std, per_prompt_metrics, summarize, total_variation,
)

EXACT = dict(abs=1e-12)


@pytest.mark.parametrize("freqs, expected", [
    ([0.5, 0.5], 0.0),
    ([0.8, 0.2], 0.6),                                    # one pair
    ([1.0, 0.0], 1.0),
    ([0.25] * 4, 0.0),
    ([0.5, 0.25, 0.25, 0.0], 1.5 / 6),                    # pairs: .25 .25 .5 0 .25 .25
    ([0.4, 0.3, 0.2, 0.1], 1.0 / 6),                      # pairs: .1 .2 .3 .1 .2 .1
    ([0.125] * 8, 0.0),
    ([1.0] + [0.0] * 7, 7 / 28),                          # 7 pairs differ by 1 of 28
    ([0.5, 0.5] + [0.0] * 6, 12 * 0.5 / 28),              # 12 pairs differ by .5
])
def test_bias_matches_hand_values(freqs, expected):
    assert bias(freqs) == pytest.approx(expected, **EXACT)


def test_bias_from_labels_for_k_2_4_8():
    gender = [0, 0, 0, 1, 0, -1]                           # 4 of class 0, 1 of class 1, 1 without a face
    race = [0, 1, 2, 3, 3, -1]
    assert bias(class_frequencies(gender, 2).freqs) == pytest.approx(0.6, **EXACT)  # (.8, .2)
    assert bias(class_frequencies(race, 4).freqs) == pytest.approx(3 * 0.2 / 6, **EXACT)  # (.2,.2,.2,.4)
    cells = joint_labels([gender, race], [2, 4])
    assert cells.tolist() == [0, 1, 2, 7, 3, -1]           # cell = gender * 4 + race
    freqs = class_frequencies(cells, 8).freqs               # .2 at cells 0,1,2,3,7; 0 at 4,5,6
    assert bias(freqs) == pytest.approx(15 * 0.2 / 28, **EXACT)  # 5 x 3 pairs differ by .2


def test_class_frequencies_count_faceless_images_separately():
    stats = class_frequencies(torch.tensor([0, 1, 1, -1, -1]), 2)
    assert stats.freqs.tolist() == pytest.approx([1 / 3, 2 / 3], **EXACT)
    assert (stats.counts.tolist(), stats.no_face, stats.num_images) == ([1, 2], 2, 5)
    assert class_frequencies([2, 2, 9], 3, no_face=9).no_face == 1
    empty = class_frequencies([-1, -1], 2)
    assert np.isnan(empty.freqs).all() and empty.no_face == 2
    assert all(math.isnan(frequency_metrics([-1, -1], 2)[key]) for key in ("bias", "kl", "total_variation"))


@pytest.mark.parametrize("labels, num_classes, error", [
    ([0, 2], 2, ValueError), ([0, -2], 2, ValueError), ([[0, 1]], 2, TypeError), ([0.5], 2, TypeError),
    ([0], 0, ValueError),
])
def test_class_frequencies_rejects_bad_labels(labels, num_classes, error):
    with pytest.raises(error):
        class_frequencies(labels, num_classes)


def test_distances_to_a_uniform_target():
    freqs = [0.5, 0.25, 0.25, 0.0]
    assert total_variation(freqs) == pytest.approx(0.25, **EXACT)
    assert fairness_discrepancy(freqs) == pytest.approx(math.sqrt(0.0625 + 0 + 0 + 0.0625), **EXACT)
    assert kl_divergence(freqs) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(1), **EXACT)  # empty: 0
    assert kl_divergence([1.0, 0.0]) == pytest.approx(math.log(2), **EXACT)
    for metric in (total_variation, fairness_discrepancy, kl_divergence):
        assert metric([0.125] * 8) == pytest.approx(0.0, **EXACT)


def test_distances_to_a_non_uniform_target():
    freqs, target = [0.5, 0.5], [0.75, 0.25]              # age young/old, seed 0132
    assert total_variation(freqs, target) == pytest.approx(0.25, **EXACT)
    assert fairness_discrepancy(freqs, target) == pytest.approx(math.sqrt(2 * 0.0625), **EXACT)
    assert kl_divergence(freqs, target) == pytest.approx(0.5 * math.log(4 / 3), **EXACT)
    assert total_variation(target, target) == fairness_discrepancy(target, target) == kl_divergence(target, target) == 0
    # a class the target excludes but the images show: large and finite, from the documented floor
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / KL_EPSILON))
    with pytest.raises(ValueError, match="target has 3 classes"):
        total_variation([0.5, 0.5], [0.2, 0.3, 0.5])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_binary_delta_equals_bias_for_two_classes(p):
    assert binary_delta(p) == pytest.approx(abs(0.5 - p) / 0.5, **EXACT)
    assert binary_delta(p) == pytest.approx(bias([p, 1 - p]), **EXACT)


def test_per_prompt_metrics_and_summary():
    per_prompt = per_prompt_metrics({"a nurse": [1, 1, 1, 0], "a pilot": [0, 0, -1, 1, 1]}, 2, target=[0.5, 0.5])
    assert per_prompt["a nurse"]["bias"] == pytest.approx(0.5, **EXACT)  # (.25, .75)
    assert per_prompt["a pilot"]["bias"] == pytest.approx(0.0, **EXACT)
    assert per_prompt["a pilot"]["freqs"] == [0.5, 0.5] and per_prompt["a pilot"]["no_face"] == 1
    summary = summarize(per_prompt)
    assert summary["bias"] == pytest.approx({"mean": 0.25, "std": 0.25, "count": 2}, **EXACT)
    assert summary["total_variation"]["mean"] == pytest.approx(0.125, **EXACT)
    assert summary["no_face"] == {"total": 1}
    assert set(summary) == {"bias", "total_variation", "kl", "fairness_discrepancy", "no_face"}


def test_mean_std_skips_nan_and_supports_sample_std():
    assert mean_std([0.1, float("nan"), 0.3]) == pytest.approx({"mean": 0.2, "std": 0.1, "count": 2}, **EXACT)
    assert mean_std([0.1, 0.3], ddof=1)["std"] == pytest.approx(math.sqrt(0.02), **EXACT)
    assert math.isnan(mean_std([float("nan")])["mean"])


def test_bad_inputs_are_refused_not_moved_into_another_cell_or_compared_against():
    with pytest.raises(ValueError, match=r"labels\[1\] must be in \[0, 4\) or -1 \(no face\), got \[-2, 4\]"):
        joint_labels([[0, 1, 0], [4, -2, -1]], [2, 4])  # race 4 was read as cell 4: male, race 0
    assert joint_labels([[0, 1], [3, -1]], [2, 4]).tolist() == [3, -1]
    with pytest.raises(ValueError, match=r"got \[4\]$"):  # plain ints, not numpy's np.int64(4)
        class_frequencies([4], 4)
    with pytest.raises(ValueError, match="target must be probabilities >= 0 summing to 1"):
        total_variation([0.5, 0.5], [1.0, 1.0])
    rows = {"a": {"score": np.float32(0.25)}, "b": {"score": np.float32(0.75)}}
    assert summarize(rows)["score"]["mean"] == pytest.approx(0.5)  # numpy's float32 metrics are metrics too


def test_counts_or_other_numbers_are_refused_where_frequencies_go():
    """Counts (class_frequencies(...).counts) gave a total variation of 1.5 and a bias of 2.0, without an error."""
    stats = class_frequencies([0, 0, 0, 1], 2)
    for metric in (bias, total_variation, kl_divergence, fairness_discrepancy):
        with pytest.raises(ValueError, match=r"freqs must be class frequencies >= 0 summing to 1 .*not its counts"):
            metric(stats.counts)
        with pytest.raises(ValueError, match="freqs must be class frequencies"):
            metric([1.5, -0.5])
        assert metric(stats) == metric(stats.freqs)  # the whole result: its frequencies
        assert math.isnan(metric([float("nan")] * 2))  # no face in any image
    with pytest.raises(ValueError, match=r"binary_delta: p=1.5 is not a frequency in \[0, 1\]"):
        binary_delta(1.5)
    assert math.isnan(binary_delta(float("nan")))

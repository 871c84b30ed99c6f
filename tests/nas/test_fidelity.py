"""Rank agreement between a proxy and a longer training: values computed by hand, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nas.fidelity import (
    MIN_N,
    agreement,
    bootstrap_interval,
    kendall_tau_b,
    paired_difference,
    seed_to_seed_tau,
    spearman_rho,
    top_k_overlap,
)


def test_kendall_tau_b_without_ties_counts_discordant_pairs():
    # 10 pairs; (2,3) and (4,5) are swapped: (8 - 2) / 10
    assert kendall_tau_b([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(0.6)


def test_kendall_tau_b_corrects_for_ties_in_both_rankings():
    # pairs: 4 concordant, 0 discordant, one tied in x (2,2), one tied in y (3,3): 4 / sqrt((6-1)(6-1))
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)


def test_spearman_rho_uses_average_ranks_for_ties():
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120
    assert spearman_rho([1, 2, 3, 4, 5], [1, 3, 2, 5, 4]) == pytest.approx(0.8)
    # ranks x (1, 2.5, 2.5, 4), y (1, 2, 3.5, 3.5): Pearson of ranks = 3.75 / 4.5
    assert spearman_rho([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(3.75 / 4.5)


def test_a_constant_ranking_has_no_tau():
    assert math.isnan(kendall_tau_b([1, 2, 3], [0.5, 0.5, 0.5]))
    a = agreement([1, 2, 3, 4, 5], [7, 7, 7, 7, 7])
    assert a.tau_b is None and "tied" in a.why_not


def test_no_tau_is_reported_below_five_candidates():
    a = agreement([0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4])
    assert a.n == 4 and a.tau_b is None and a.rho is None
    assert f"n=4 < {MIN_N}" in a.why_not and "not computed" in a.line()
    assert agreement(range(5), range(5)).tau_b == pytest.approx(1.0)


def test_agreement_intervals_bracket_the_estimate_and_are_reproducible():
    rng = np.random.default_rng(3)
    proxy = rng.random(12)
    confirmed = proxy + 0.3 * rng.random(12)
    a, b = agreement(proxy, confirmed, seed=1), agreement(proxy, confirmed, seed=1)
    assert a.tau_b == pytest.approx(kendall_tau_b(proxy, confirmed))
    assert a.tau_interval.low <= a.tau_b <= a.tau_interval.high <= 1
    assert a.rho_interval.low <= a.rho <= a.rho_interval.high <= 1
    assert a.to_dict() == b.to_dict()
    assert "n=12" in a.line() and "90%" in a.line()


def test_bootstrap_skips_degenerate_resamples_and_says_how_many_it_used():
    # two distinct values among 5: many resamples draw one value only (τ undefined) and are skipped
    interval = bootstrap_interval(kendall_tau_b, ([0, 0, 0, 0, 1], [0, 0, 0, 0, 1]), resamples=400)
    assert 0 < interval.used < 400
    assert interval.low == pytest.approx(1.0) and interval.high == pytest.approx(1.0)


def test_paired_difference_of_a_proxy_with_itself_is_exactly_zero():
    x, ref = [0.1, 0.4, 0.2, 0.5, 0.3, 0.6], [0.2, 0.5, 0.1, 0.6, 0.4, 0.3]
    diff, interval = paired_difference(x, x, ref)
    assert diff == 0 and interval.low == 0 and interval.high == 0
    better, _ = paired_difference(ref, x, ref)  # the reference itself ranks perfectly: tau 1 - tau(x, ref)
    assert better == pytest.approx(1 - kendall_tau_b(x, ref))


def test_top_k_overlap_counts_shared_members_of_both_top_k():
    proxy = [0.9, 0.8, 0.7, 0.1, 0.2]
    confirmed = [0.9, 0.1, 0.7, 0.8, 0.2]  # top-3 {0, 2, 3} against the proxy's {0, 1, 2}
    assert top_k_overlap(proxy, confirmed, 3) == 2
    assert top_k_overlap(proxy, confirmed, 1) == 1
    assert top_k_overlap(proxy, confirmed, 10) == 5  # clipped to N


def test_seed_to_seed_tau_is_the_mean_over_seed_pairs():
    scores = np.array([[1, 1, 2], [2, 3, 1], [3, 2, 3], [4, 4, 4], [5, 5, 5]], dtype=float)
    expected = np.mean([kendall_tau_b(scores[:, 0], scores[:, 1]), kendall_tau_b(scores[:, 0], scores[:, 2]),
                        kendall_tau_b(scores[:, 1], scores[:, 2])])
    assert seed_to_seed_tau(scores) == pytest.approx(expected)
    assert kendall_tau_b(scores[:, 0], scores[:, 1]) == pytest.approx(0.8)  # one swapped pair of 10
    assert math.isnan(seed_to_seed_tau(scores[:, :1]))


def test_rankings_must_be_finite_and_of_one_length():
    with pytest.raises(ValueError, match="one length"):
        kendall_tau_b([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        agreement([1, 2, 3, 4, 5], [1, 2, np.nan, 4, 5])

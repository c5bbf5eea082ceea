"""The mixture deals every source its weighted share, each source reading its own stream in order."""

from __future__ import annotations

import numpy as np
import pytest

from data.mixture import Mixture, quotas


def test_quotas_are_largest_remainder_shares() -> None:
    assert quotas([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert quotas([0.7, 0.2, 0.1], 1024).tolist() == [717, 205, 102]
    assert quotas([5.0], 64).tolist() == [64]


def test_a_source_with_no_quota_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.weight"):
        quotas([1.0, 1e-6], 1024)


def test_each_source_reads_its_own_samples_in_order_without_gaps() -> None:
    weights, window, windows = [3.0, 1.0, 0.5], 64, 5
    mixture = Mixture(weights, window, key=(0, 0))
    source, local = mixture.locate(np.arange(window * windows))
    for s, q in enumerate(mixture.quotas):
        mine = local[source == s]
        assert sorted(mine.tolist()) == list(range(q * windows))
        # Each window serves a contiguous run of the source's samples.
        for c in range(windows):
            in_window = local[(source == s) & (np.arange(window * windows) // window == c)]
            assert sorted(in_window.tolist()) == list(range(c * q, (c + 1) * q))
    shares = np.bincount(source) / len(source)
    assert np.allclose(shares, np.array(weights) / sum(weights), atol=1 / window)


def test_consumed_counts_match_locate() -> None:
    mixture = Mixture([2.0, 1.0], 16, key=(1, 0))
    source, _ = mixture.locate(np.arange(100))
    for g in (0, 1, 15, 16, 17, 50, 100):
        assert mixture.consumed(g).tolist() == np.bincount(source[:g], minlength=2).tolist()


def test_single_source_is_the_identity() -> None:
    source, local = Mixture([1.0], 8, key=(0, 0)).locate(np.arange(20))
    assert not source.any() and local.tolist() == list(range(20))

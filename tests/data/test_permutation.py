"""The keyed Feistel permutation is a bijection, deterministic, key-dependent and well mixed."""

from __future__ import annotations

import numpy as np
import pytest

from data.permutation import Permutation


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 100, 1023, 1024, 1025, 4097])
def test_is_a_bijection_on_range_n(n: int) -> None:
    image = Permutation(n, (1, 2))(np.arange(n))
    assert sorted(image.tolist()) == list(range(n))


def test_depends_only_on_the_key() -> None:
    idx = np.arange(1000)
    assert np.array_equal(Permutation(1000, (7, 0))(idx), Permutation(1000, (7, 0))(idx))
    assert not np.array_equal(Permutation(1000, (7, 0))(idx), Permutation(1000, (7, 1))(idx))
    assert not np.array_equal(Permutation(1000, (7, 0))(idx), Permutation(1000, (8, 0))(idx))
    # Evaluated per index: any subset gives the same images as the whole.
    full = Permutation(1000, (3,))(idx)
    assert np.array_equal(Permutation(1000, (3,))(idx[[5, 999, 0]]), full[[5, 999, 0]])


def test_looks_uniformly_random() -> None:
    n = 100_000
    image = Permutation(n, (0,))(np.arange(n))
    assert abs(np.corrcoef(image, np.arange(n))[0, 1]) < 0.02
    assert (image == np.arange(n)).sum() < 10  # a uniform permutation has ~1 fixed point
    # Neighbours land far apart: consecutive inputs do not stay consecutive.
    assert np.median(np.abs(np.diff(image))) > n / 10
    # Every tenth of the outputs receives a tenth of every tenth of the inputs (to within 10%).
    counts = np.histogram2d(np.arange(n), image, bins=10)[0]
    assert np.all(np.abs(counts - n / 100) < n / 1000)


def test_rejects_indices_outside_the_domain() -> None:
    with pytest.raises(IndexError):
        Permutation(5, (0,))(np.array([5]))

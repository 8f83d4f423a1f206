"""The project's one Spearman correlation against scipy's, on tied and untied data, and its
invariance under relabelling the classes of similarity matrices; the class-mean helper."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kdablate.components.structure import class_mean_structure, class_means, oracle_structure
from kdablate.metrics import average_ranks, offdiagonal, spearman


def scipy_rho(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(stats.spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def similarity(k: int, seed: int) -> torch.Tensor:
    """(K, K) a random row-stochastic matrix with a zero diagonal, like a class-mean structure."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(k, k, generator=g).fill_diagonal_(-math.inf), 1)


def test_average_ranks_are_scipys():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    assert average_ranks(x).tolist() == stats.rankdata(x.numpy()).tolist() == [5.0, 1.5, 5.0, 3.0, 5.0, 1.5]
    assert average_ranks(x).dtype == torch.float64


@pytest.mark.parametrize("k, groups", [(10, torch.arange(10) // 3), (20, torch.arange(20) % 4),
                                       (8, torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]))])
def test_oracle_correlation_matches_scipy(k, groups):
    """The oracle matrix holds only a few distinct values: nearly every entry is tied."""
    oracle = offdiagonal(oracle_structure(torch.arange(k), groups, 0.8))
    assert len(set(oracle.tolist())) < len(oracle) // 4
    for seed in range(3):
        sim = offdiagonal(similarity(k, seed))
        assert spearman(sim, oracle) == pytest.approx(scipy_rho(sim, oracle), abs=1e-12)


def test_integer_data_with_many_ties_matches_scipy():
    g = torch.Generator().manual_seed(1)
    for n, levels in ((7, 2), (50, 3), (400, 5), (1000, 40)):
        a, b = torch.randint(0, levels, (n,), generator=g), torch.randint(0, levels, (n,), generator=g)
        b = torch.where(torch.rand(n, generator=g) < 0.5, a, b)  # correlated, so rho is far from 0
        assert spearman(a, b) == pytest.approx(scipy_rho(a, b), abs=1e-12)
        assert spearman(a.float(), b.double()) == pytest.approx(scipy_rho(a, b), abs=1e-12)


def test_continuous_data_matches_scipy_and_shape_is_flattened():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(12, 9, generator=g)
    b = a + torch.randn(12, 9, generator=g)
    assert spearman(a, b) == pytest.approx(scipy_rho(a, b), abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0, abs=1e-12) and spearman(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert spearman(a, torch.exp(a)) == pytest.approx(1.0, abs=1e-12)  # ranks only: any increasing map


def test_relabelling_the_classes_keeps_the_correlation():
    """A' = A[P][:, P] lists the same (row, column) pairs in another order; with ties broken
    by position (the old spearman) the correlation of tied entries changed with P."""
    k = 10
    a = oracle_structure(torch.arange(k), torch.arange(k) // 3, 0.8)
    b = oracle_structure(torch.arange(k), torch.tensor([0, 1, 1, 2, 2, 2, 0, 3, 3, 1]), 0.8)
    c = similarity(k, 3)
    for x, y in ((a, c), (a, b), (c, similarity(k, 4))):
        want = spearman(offdiagonal(x), offdiagonal(y))
        assert want == pytest.approx(scipy_rho(offdiagonal(x), offdiagonal(y)), abs=1e-12)
        for seed in range(5):
            p = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
            got = spearman(offdiagonal(x[p][:, p]), offdiagonal(y[p][:, p]))
            assert got == pytest.approx(want, abs=1e-12)


def test_constant_side_or_nan_gives_nan_as_scipy_does():
    x = torch.arange(6.0)
    with pytest.warns(stats.ConstantInputWarning):
        assert math.isnan(scipy_rho(torch.ones(6), x))
    assert math.isnan(spearman(torch.ones(6), x)) and math.isnan(spearman(x, torch.full((6,), 0.2)))
    assert math.isnan(spearman(torch.tensor([1.0, math.nan, 3.0]), torch.tensor([1.0, 2.0, 3.0])))
    assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([2.0])))
    with pytest.raises(ValueError, match="one shape"):
        spearman(torch.ones(3), torch.ones(4))


def test_offdiagonal_keeps_row_major_order():
    m = torch.arange(9.0).view(3, 3)
    assert offdiagonal(m).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_class_means_average_each_class_and_fall_back_to_uniform():
    g = torch.Generator().manual_seed(5)
    k = 5
    labels = torch.tensor([0, 0, 2, 2, 2, 4])  # classes 1 and 3 have no samples
    r = torch.softmax(torch.randn(6, k, generator=g), 1)
    got = class_mean_structure(r, labels, k)
    for c in (0, 2, 4):
        assert got[c].tolist() == pytest.approx((r[labels == c].sum(0) / (labels == c).sum()).tolist(), abs=1e-7)
    for c in (1, 3):
        want = np.full(k, 1 / (k - 1))
        want[c] = 0
        assert got[c].tolist() == want.tolist()  # 1/4 is exact in float32
    sums = torch.zeros(k, k).index_add_(0, labels, r)
    assert torch.equal(class_means(sums, torch.bincount(labels, minlength=k).float()), got)

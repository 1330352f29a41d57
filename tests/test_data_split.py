import pytest
import torch

from lightning_reweight.data import balanced_meta_split, stratified_split


def test_meta_split_balanced_disjoint_covering():
    y = torch.tensor([0] * 30 + [1] * 12 + [2] * 7)[torch.randperm(49, generator=torch.Generator().manual_seed(0))]
    meta, train = balanced_meta_split(y, 5, seed=1)
    assert torch.bincount(y[meta]).tolist() == [5, 5, 5]
    assert torch.bincount(y[train]).tolist() == [25, 7, 2]
    assert set(meta.tolist()).isdisjoint(train.tolist())
    assert sorted(meta.tolist() + train.tolist()) == list(range(49))
    again, _ = balanced_meta_split(y.tolist(), 5, seed=1)
    other, _ = balanced_meta_split(y, 5, seed=2)
    assert torch.equal(meta, again) and not torch.equal(meta, other)


def test_meta_split_errors():
    y = [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="per_class=3.*class 2"):
        balanced_meta_split(y, 3)
    with pytest.raises(ValueError, match="per_class"):
        balanced_meta_split(y, 0)
    with pytest.raises(TypeError, match="per_class"):
        balanced_meta_split(y, 1.5)


def test_stratified_split_sizes_by_hand():
    y = torch.tensor([0] * 40 + [1] * 20 + [2] * 15)
    val, rest = stratified_split(y, [0.1], seed=0)
    # round(4.0) + round(2.0) + round(1.5) = 4 + 2 + 2 (round half to even)
    assert torch.bincount(y[val], minlength=3).tolist() == [4, 2, 2]
    assert sorted(val.tolist() + rest.tolist()) == list(range(75))
    a, b, c = stratified_split(y, [0.5, 0.25, 0.25], seed=0)
    assert torch.bincount(y[a]).tolist() == [20, 10, 8]  # 7.5 -> 8
    assert torch.bincount(y[b]).tolist() == [10, 5, 3]   # round(11.25) - 8 = 3
    assert torch.bincount(y[c]).tolist() == [10, 5, 4]
    assert sorted(torch.cat([a, b, c]).tolist()) == list(range(75))


def test_stratified_split_deterministic():
    y = torch.arange(3).repeat(20)
    assert torch.equal(stratified_split(y, [0.3], seed=4)[0], stratified_split(y, [0.3], seed=4)[0])
    assert not torch.equal(stratified_split(y, [0.3], seed=4)[0], stratified_split(y, [0.3], seed=5)[0])


def test_stratified_split_errors():
    with pytest.raises(ValueError, match="fractions"):
        stratified_split([0, 1], [0.6, 0.6])
    with pytest.raises(ValueError, match=r"fractions\[1\]"):
        stratified_split([0, 1], [0.5, -0.1])
    with pytest.raises(ValueError, match="fractions"):
        stratified_split([0, 1], [])


def test_stratified_split_takes_array_and_tensor_fractions():
    """numpy or torch fractions give the parts the same fractions as a list give (the by-hand sizes above)."""
    np = pytest.importorskip("numpy")
    y = torch.tensor([0] * 40 + [1] * 20 + [2] * 15)
    want = stratified_split(y, [0.5, 0.25, 0.25], seed=0)
    for fractions in (np.array([0.5, 0.25, 0.25]), torch.tensor([0.5, 0.25, 0.25]), (np.float64(0.5), 0.25, 0.25)):
        got = stratified_split(y, fractions, seed=0)
        assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.bincount(y[want[0]]).tolist() == [20, 10, 8]


def test_fractions_summing_to_one_up_to_rounding_give_no_extra_part():
    """0.7 + 0.29 + 0.01 is 1 in decimals, but the binary floats sum to 1 - 2^-53: still three parts, not a fourth
    (empty or one-sample) remainder part."""
    import math

    assert math.fsum([0.7, 0.29, 0.01]) < 1.0  # what makes the case
    y = torch.arange(4).repeat(100)
    parts = stratified_split(y, [0.7, 0.29, 0.01], seed=0)
    assert len(parts) == 3
    assert sorted(torch.cat(parts).tolist()) == list(range(400))
    assert [torch.bincount(y[p], minlength=4).tolist() for p in parts] == [[70] * 4, [29] * 4, [1] * 4]

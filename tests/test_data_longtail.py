import pytest
import torch

from lightning_reweight.data import class_counts, long_tailed_counts, long_tailed_indices


def test_cifar10_lt_counts_match_published_numbers():
    counts = long_tailed_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406
    # Dataset sizes reported for CIFAR-10-LT / CIFAR-100-LT (LDAM-DRW protocol).
    assert sum(long_tailed_counts(5000, 10, 10)) == 20431
    assert sum(long_tailed_counts(500, 100, 100)) == 10847


def test_balanced_and_step_profiles():
    assert long_tailed_counts(5000, 10, 1.0) == [5000] * 10
    assert long_tailed_counts(5000, 10, 10, profile="step") == [5000] * 5 + [500] * 5
    assert long_tailed_counts(300, 5, 100, profile="step") == [300, 300, 3, 3, 3]
    assert long_tailed_counts(7, 1, 50) == [7]


def test_class_counts_by_hand():
    assert class_counts([3, 0, 3, 1]) == [1, 1, 0, 2]
    assert class_counts(torch.tensor([1]), num_classes=4) == [0, 1, 0, 0]


def test_indices_follow_exp_profile():
    y = torch.arange(10).repeat(50)  # 50 per class, interleaved
    kept = long_tailed_indices(y, 10.0, seed=1)
    expected = [int(50 * 0.1 ** (i / 9)) for i in range(10)]
    assert expected[0] == 50 and expected[-1] == 5
    assert class_counts(y[kept], 10) == expected
    assert torch.equal(kept, kept.sort().values) and kept.unique().numel() == kept.numel()
    assert kept.dtype == torch.long


def test_rho_one_keeps_everything_and_step_profile():
    y = torch.arange(4).repeat_interleave(20)
    assert torch.equal(long_tailed_indices(y, 1.0), torch.arange(80))
    kept = long_tailed_indices(y, 4.0, profile="step")
    assert class_counts(y[kept]) == [20, 20, 5, 5]


def test_default_n_max_is_smallest_class():
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 25)
    kept = long_tailed_indices(y, 2.0)
    assert class_counts(y[kept]) == [20, 14, 10]  # 20 * 0.5 ** 0.5 = 14.1


def test_deterministic_and_seed_dependent():
    y = torch.arange(5).repeat(100)
    assert torch.equal(long_tailed_indices(y, 5.0, seed=3), long_tailed_indices(y.tolist(), 5.0, seed=3))
    assert not torch.equal(long_tailed_indices(y, 5.0, seed=3), long_tailed_indices(y, 5.0, seed=4))


def test_errors():
    y = torch.arange(3).repeat(10)
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tailed_indices(y, 0.5)
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tailed_counts(10, 3, 0.9)
    with pytest.raises(ValueError, match="profile"):
        long_tailed_indices(y, 2.0, profile="linear")
    with pytest.raises(ValueError, match="class 0 holds 10"):
        long_tailed_indices(y, 2.0, n_max=11)
    with pytest.raises(ValueError, match="n_max"):
        long_tailed_counts(0, 3, 2.0)
    with pytest.raises(ValueError, match="num_classes"):
        long_tailed_counts(10, 0, 2.0)


def test_emptied_classes_are_warned_about():
    """rho > n_max empties tail classes: n_i = int(20 * (1/100) ** (i/4)) = [20, 6, 2, 0, 0]."""
    y = torch.arange(5).repeat_interleave(20)
    with pytest.warns(UserWarning, match=r"leaves 2 of 5 classes with no samples \(classes \[3, 4\]\)"):
        kept = long_tailed_indices(y, 100.0)
    assert class_counts(y[kept], 5) == [20, 6, 2, 0, 0]
    with pytest.warns(UserWarning, match="classes with no samples"):
        long_tailed_counts(4, 6, 10, profile="step")  # int(4 / 10) = 0 for classes 3..5
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        long_tailed_counts(100, 10, 100)  # the tail keeps int(1.0) = 1 sample: no warning


def test_exact_whole_counts_are_not_truncated_below():
    """int() truncated counts that floating point left a hair below a whole number (49 * (1/49) ** 1 gave a tail
    of 0 and a warning that n_max >= imbalance_ratio was needed, which it was)."""
    for k in range(2, 120):  # three classes, rho = k^2: the exact counts are k^2, k, 1
        assert long_tailed_counts(k * k, 3, k * k) == [k * k, k, 1]
    for rho in range(2, 300):  # the tail of n_max = m * rho is exactly m
        for m in (1, 2, 3):
            assert long_tailed_counts(m * rho, 10, rho)[-1] == m
            assert long_tailed_counts(m * rho, 10, rho, profile="step")[-1] == m


def test_a_short_class_is_blamed_on_n_max_only_when_n_max_was_given():
    y = torch.tensor([0] * 10 + [1] * 4 + [2] * 0 + [3] * 6)  # class 2 empty
    with pytest.raises(ValueError, match=r"class 2 holds 0 samples.*every class needs samples"):
        long_tailed_indices(y, 2.0)
    with pytest.raises(ValueError, match=r"class 1 holds 4 samples but its long-tail quota is 7.*lower n_max"):
        long_tailed_indices(y, 2.0, n_max=10)  # exp profile, 4 classes: quotas 10, int(10 / 2 ** (1/3)) = 7, ...


def test_num_classes_keeps_the_profile_when_the_last_classes_are_empty():
    """``C`` was inferred as ``max(targets) + 1``: a pool whose last class a meta split had emptied was silently
    long-tailed over C - 1 classes (another head-to-tail profile), while an emptied middle class was an error."""
    import math

    from lightning_reweight.data import ReweightDataModule, TensorClassificationDataset

    y = torch.arange(4).repeat_interleave(10)
    with pytest.raises(ValueError, match=r"class 4 holds 0 samples"):  # its quota: int(10 / 8) = 1
        long_tailed_indices(y, 8.0, num_classes=5)
    kept = long_tailed_indices(y, 8.0, num_classes=4)
    assert class_counts(y[kept], 4) == [math.floor(10 * (1 / 8) ** (i / 3) + 1e-9) for i in range(4)]  # 10, 5, 2, 1

    class Pool(ReweightDataModule):
        num_classes = 4

        def __init__(self, counts, **kw):
            self.counts = counts
            super().__init__(**kw)

        def load_train_pool(self):
            labels = torch.cat([torch.full((n,), c) for c, n in enumerate(self.counts)])
            return TensorClassificationDataset(torch.zeros(len(labels), 1), labels), labels

        def load_test_set(self):
            return TensorClassificationDataset(torch.zeros(4, 1), torch.arange(4))

    for counts, emptied in (([50, 5, 50, 50], 1), ([50, 50, 50, 5], 3)):  # the meta split takes 5 of every class
        dm = Pool(counts, meta_per_class=5, val_fraction=0.0, imbalance_ratio=10)
        with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"class {emptied} holds 0 samples"):
            dm.setup()


def test_the_empty_class_warning_points_at_the_caller():
    y = torch.arange(5).repeat_interleave(20)
    with pytest.warns(UserWarning, match="classes with no samples") as record:
        long_tailed_indices(y, 100.0)
    assert record[0].filename == __file__

import numpy as np
import pytest
import torch

from lightning_reweight.data import inject_label_noise


def _labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat(n // num_classes)


@pytest.mark.parametrize(
    ("n", "rate", "expected"), [(1000, 0.3, 300), (37, 0.2, 7), (100, 0.0, 0), (10, 0.45, 4), (10, 0.37, 4)]
)
def test_symmetric_flips_exact_count_to_other_classes(n, rate, expected):
    y = torch.arange(n) % 10
    noisy, is_noisy = inject_label_noise(y, rate, kind="symmetric", num_classes=10, seed=3)
    assert noisy.dtype == torch.long and is_noisy.dtype == torch.bool
    assert int(is_noisy.sum()) == expected
    assert bool((noisy[is_noisy] != y[is_noisy]).all())
    assert torch.equal(noisy[~is_noisy], y[~is_noisy])
    assert torch.equal(is_noisy, noisy != y)
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_symmetric_targets_uniform_over_other_classes():
    y = torch.zeros(40000, dtype=torch.long)
    noisy, is_noisy = inject_label_noise(y, 0.9, kind="symmetric", num_classes=5, seed=0)
    counts = torch.bincount(noisy[is_noisy], minlength=5)
    assert int(counts[0]) == 0
    # 36000 flips over 4 classes: 9000 each, binomial std ~82.
    assert torch.all((counts[1:] - 9000).abs() < 500)


def test_symmetric_all_keeps_about_one_in_c():
    y = _labels(20000, 4)
    noisy, is_noisy = inject_label_noise(y, 0.5, kind="symmetric_all", seed=1)
    assert torch.equal(is_noisy, noisy != y)
    # 10000 resampled labels, each unchanged with probability 1/4: about 7500 changed (std ~43).
    assert abs(int(is_noisy.sum()) - 7500) < 300
    assert int(is_noisy.sum()) <= 10000


def test_pairflip_maps_to_next_class():
    y = _labels(1000, 10)
    noisy, is_noisy = inject_label_noise(y, 0.45, kind="pairflip", seed=0)
    assert int(is_noisy.sum()) == 450
    assert torch.equal(noisy[is_noisy], (y[is_noisy] + 1) % 10)
    assert torch.equal(noisy[~is_noisy], y[~is_noisy])


def test_pairflip_wraps_last_class():
    noisy, is_noisy = inject_label_noise([2, 2, 2, 2], 0.5, kind="pairflip", num_classes=3)
    assert sorted(noisy.tolist()) == [0, 0, 2, 2]


def test_transition_matrix_empirical_frequencies():
    matrix = [[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]]
    y = _labels(60000, 3)
    noisy, is_noisy = inject_label_noise(y, 0.0, kind=matrix, seed=5)
    for i in range(3):
        freq = torch.bincount(noisy[y == i], minlength=3).double() / 20000
        assert torch.allclose(freq, torch.tensor(matrix[i], dtype=torch.float64), atol=0.015)
    assert torch.equal(is_noisy, noisy != y)
    assert bool((noisy[y == 1] == 1).all())


def test_transition_matrix_input_types_agree_and_identity_is_noop():
    y = _labels(300, 3)
    m = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]
    a = inject_label_noise(y, 0.0, kind=m, seed=2)[0]
    b = inject_label_noise(y, 0.0, kind=np.array(m), seed=2)[0]
    c = inject_label_noise(y, 0.0, kind=torch.tensor(m), seed=2)[0]
    assert torch.equal(a, b) and torch.equal(a, c)
    noisy, is_noisy = inject_label_noise(y, 0.9, kind=torch.eye(3), seed=2)  # noise_rate ignored
    assert torch.equal(noisy, y) and not bool(is_noisy.any())


def test_deterministic_per_seed_and_global_rng_untouched():
    y = _labels(500, 5)
    state = torch.random.get_rng_state()
    a = inject_label_noise(y, 0.4, seed=7)
    b = inject_label_noise(y.tolist(), 0.4, seed=7)
    c = inject_label_noise(y, 0.4, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("rate", [-0.1, 1.0001, 1.5, float("nan")])
def test_bad_noise_rate(rate):
    with pytest.raises(ValueError, match="noise_rate"):
        inject_label_noise([0, 1, 2], rate)


def test_bad_targets():
    with pytest.raises(ValueError, match="targets"):
        inject_label_noise([0, 1, 5], 0.1, num_classes=3)
    with pytest.raises(ValueError, match="targets"):
        inject_label_noise([0, -1, 1], 0.1)
    with pytest.raises(ValueError, match="targets"):
        inject_label_noise(torch.zeros(2, 2, dtype=torch.long), 0.1)


def test_bad_kind():
    with pytest.raises(ValueError, match="symmetric.*symmetric_all.*pairflip"):
        inject_label_noise([0, 1], 0.1, kind="asymmetric")
    with pytest.raises(ValueError, match="kind.*row 1"):
        inject_label_noise([0, 1], 0.0, kind=[[1.0, 0.0], [0.6, 0.6]])
    with pytest.raises(ValueError, match="kind.*row 0.*negative"):
        inject_label_noise([0, 1], 0.0, kind=[[1.2, -0.2], [0.0, 1.0]])
    with pytest.raises(ValueError, match="kind"):
        inject_label_noise([0, 1], 0.0, kind=[[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="kind"):
        inject_label_noise([0, 1], 0.0, kind=torch.eye(3), num_classes=2)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_noise_rate_one_and_scalar_tensor_rates(kind):
    """noise_rate=1.0 corrupts every label; a 0-d tensor or numpy rate is the same rate as the float."""
    np = pytest.importorskip("numpy")
    y = torch.arange(5).repeat(8)
    noisy, is_noisy = inject_label_noise(y, 1.0, kind=kind, seed=3)
    assert bool(is_noisy.all()) and bool((noisy != y).all())
    if kind == "pairflip":
        assert torch.equal(noisy, (y + 1) % 5)
    for rate in (torch.tensor(0.25), np.float32(0.25), np.array(0.25)):
        got = inject_label_noise(y, rate, kind=kind, seed=3)
        want = inject_label_noise(y, 0.25, kind=kind, seed=3)
        assert torch.equal(got[0], want[0]) and int(got[1].sum()) == 10  # round(0.25 * 40)
    with pytest.raises(TypeError, match="noise_rate"):
        inject_label_noise(y, torch.tensor([0.2, 0.3]), kind=kind)


def test_cifar10_asymmetric_flips_each_source_class_to_its_similar_class():
    """truck -> automobile, bird -> airplane, cat <-> dog, deer -> horse (METHODS.md), rate * n_j of each source."""
    clean = torch.arange(10).repeat_interleave(300)  # 300 per class, 3000 in all
    noisy, mask = inject_label_noise(clean, 0.4, kind="cifar10_asymmetric", seed=1)
    pairs = {(int(c), int(n)) for c, n in zip(clean[mask], noisy[mask])}
    assert pairs == {(9, 1), (2, 0), (3, 5), (5, 3), (4, 7)}  # written out from the convention
    per_class = torch.bincount(clean[mask], minlength=10).tolist()
    assert per_class == [0, 0, 120, 120, 120, 120, 0, 0, 0, 120]  # 40% of each source class, nothing elsewhere
    assert torch.equal(mask, noisy != clean)
    again, _ = inject_label_noise(clean, 0.4, kind="cifar10_asymmetric", seed=1)
    other, _ = inject_label_noise(clean, 0.4, kind="cifar10_asymmetric", seed=2)
    assert torch.equal(again, noisy) and not torch.equal(other, noisy)
    with pytest.raises(ValueError, match="10 classes"):
        inject_label_noise(torch.arange(4).repeat(5), 0.4, kind="cifar10_asymmetric")


def test_datamodule_takes_cifar10_asymmetric_noise_and_pin_memory():
    from lightning_reweight.data import ReweightDataModule
    from lightning_reweight.data.indexed import TensorClassificationDataset

    class Ten(ReweightDataModule):
        num_classes = 10

        def load_train_pool(self):
            y = torch.arange(10).repeat(40)
            return TensorClassificationDataset(torch.randn(400, 3), y), y

        def load_test_set(self):
            return TensorClassificationDataset(torch.randn(10, 3), torch.arange(10))

    dm = Ten(noise_rate=0.5, noise_kind="cifar10_asymmetric", meta_per_class=2, val_fraction=0.0, pin_memory=True)
    dm.setup()
    flipped = dm.clean_train_targets[dm.noise_mask]
    assert set(flipped.tolist()) == {2, 3, 4, 5, 9} and len(flipped) == 5 * 19  # half of 38 per source class
    assert all(loader.pin_memory for loader in (dm.train_dataloader(), dm.meta_dataloader(), dm.val_dataloader()))
    assert not Ten().pin_memory
    # a training sampler set by the user (or DRS), plain or batched, keeps it too
    from torch.utils.data import BatchSampler, SequentialSampler

    n = len(dm.train_dataset)
    for sampler in (SequentialSampler(range(n)), BatchSampler(SequentialSampler(range(n)), 8, False)):
        dm.train_sampler = sampler
        assert dm.train_dataloader().pin_memory


def test_the_cifar10_convention_is_refused_at_construction_for_another_class_count():
    """A 100-class datamodule accepted noise_kind="cifar10_asymmetric" and failed only in setup, with a message
    about an argument named ``kind`` (even at noise_rate=0)."""
    from lightning_reweight.data import CIFAR100DataModule, DigitsDataModule

    with pytest.raises(ValueError, match=r"noise_kind='cifar10_asymmetric' .* CIFAR100DataModule has 100 classes"):
        CIFAR100DataModule(noise_kind="cifar10_asymmetric", noise_rate=0.0)
    assert DigitsDataModule(noise_kind="cifar10_asymmetric", noise_rate=0.2).noise_kind == "cifar10_asymmetric"

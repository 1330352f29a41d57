import pickle
import sys

import numpy as np
import pytest
import torch
from cifar_files import write_cifar10, write_cifar100

from lightning_reweight.data import CIFAR10DataModule, CIFAR100DataModule

torchvision = pytest.importorskip("torchvision")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    """5 training batches of 20 images (image k has label k % 10) and a 20-image test batch."""
    root = tmp_path_factory.mktemp("cifar10")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(100, 3072), dtype=np.uint8)
    labels = [k % 10 for k in range(100)]
    test_labels = [(3 * k) % 10 for k in range(20)]
    write_cifar10(root, data, labels, rng.integers(0, 256, size=(20, 3072), dtype=np.uint8), test_labels)
    return root, data, torch.tensor(labels), torch.tensor(test_labels)


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
    """300 training images (3 per fine class, label k % 100) and 100 test images."""
    root = tmp_path_factory.mktemp("cifar100")
    rng = np.random.default_rng(1)
    fine = [k % 100 for k in range(300)]
    test_fine = [(7 * k) % 100 for k in range(100)]
    write_cifar100(root, rng.integers(0, 256, size=(300, 3072), dtype=np.uint8), fine,
                   rng.integers(0, 256, size=(100, 3072), dtype=np.uint8), test_fine)
    return root, torch.tensor(fine), torch.tensor(test_fine)


def _cifar10(root, **kwargs):
    kwargs.setdefault("verify_checksums", False)
    dm = CIFAR10DataModule(data_dir=str(root), **kwargs)
    dm.setup()
    return dm


def test_reads_images_and_labels(cifar10_dir):
    root, data, labels, test_labels = cifar10_dir
    dm = _cifar10(root, augment=False, val_fraction=0.0, meta_per_class=0, batch_size=10)
    assert len(dm.train_dataset) == 100 and len(dm.test_dataset) == 20
    assert dm.num_classes == 10
    assert torch.equal(dm.clean_train_targets, labels[dm.train_indices])
    assert torch.equal(torch.tensor([int(dm.test_dataset[i][1]) for i in range(20)]), test_labels)
    raw = dm.train_dataset.dataset.dataset
    assert isinstance(raw, torchvision.datasets.CIFAR10) and raw.classes[9] == "truck"
    i = 37
    x, y, idx = dm.train_dataset[i]
    assert idx == i and int(y) == labels[dm.train_indices[i]]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    expected = torch.tensor(data[int(dm.train_indices[i])], dtype=torch.float32).view(3, 32, 32) / 255
    assert torch.allclose(x * std + mean, expected, atol=1e-5)
    xb, yb, ib = next(iter(dm.train_dataloader()))
    assert xb.shape == (10, 3, 32, 32) and torch.equal(dm.train_targets[ib], yb)
    # datasets must pickle (spawned dataloader workers, DDP)
    copy = pickle.loads(pickle.dumps(dm.train_dataset))
    assert torch.equal(copy[i][0], x) and type(copy.dataset.dataset).__name__ == "UnverifiedCIFAR10"


def test_long_tail_and_noise_apply(cifar10_dir):
    root, _, labels, _ = cifar10_dir
    dm = _cifar10(root, val_fraction=0.1, meta_per_class=2, imbalance_ratio=7.0, noise_rate=0.5, seed=1)
    # 10 per class: 1 validation, 2 meta, 7 left -> n_max = 7
    assert len(dm.val_dataset) == 10 and len(dm.meta_dataset) == 20
    assert dm.clean_train_class_counts == [int(7 * (1 / 7) ** (i / 9)) for i in range(10)]
    assert int(dm.noise_mask.sum()) == round(0.5 * len(dm.train_dataset))
    assert torch.equal(dm.noise_mask, dm.train_targets != dm.clean_train_targets)
    meta_labels = torch.tensor([int(dm.meta_dataset[i][1]) for i in range(20)])
    assert torch.equal(meta_labels, labels[dm.meta_indices])
    assert dm.meta_dataset[0][0].shape == (3, 32, 32)  # augmented crop keeps the size


def test_checksums_missing_files_and_prepare_data(cifar10_dir, tmp_path):
    root = cifar10_dir[0]
    with pytest.raises(RuntimeError, match="verify_checksums=False"):
        CIFAR10DataModule(data_dir=str(root)).setup()
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    dm.prepare_data()  # download=False: nothing to do, no network
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup()
    with pytest.raises(TypeError, match="download"):
        CIFAR10DataModule(download="yes")
    # one file missing, the class-name file included: named, with the download hint (not torchvision's error)
    import shutil

    for name in ("batches.meta", "test_batch"):
        partial = tmp_path / f"without_{name}"
        shutil.copytree(root, partial)
        (partial / "cifar-10-batches-py" / name).unlink()
        with pytest.raises(FileNotFoundError, match=rf"missing: {name}\). Pass download=True"):
            CIFAR10DataModule(data_dir=str(partial), verify_checksums=False).setup()


def test_cifar100_fine_labels(cifar100_dir):
    root, fine, test_fine = cifar100_dir
    dm = CIFAR100DataModule(data_dir=str(root), verify_checksums=False, val_fraction=0.0, meta_per_class=1,
                            noise_rate=0.2, augment=False)
    dm.setup()
    assert dm.num_classes == 100 and len(dm.meta_dataset) == 100 and len(dm.train_dataset) == 200
    assert torch.equal(dm.clean_train_targets, fine[dm.train_indices])
    assert dm.clean_train_class_counts == [2] * 100
    assert int(dm.noise_mask.sum()) == 40
    assert torch.equal(torch.tensor([int(dm.test_dataset[i][1]) for i in range(100)]), test_fine)
    raw = dm.train_dataset.dataset.dataset
    assert isinstance(raw, torchvision.datasets.CIFAR100) and raw.classes[5] == "c5"


def test_missing_torchvision_names_the_extra(cifar10_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"lightning-reweight\[vision\]"):
        CIFAR10DataModule(data_dir=str(cifar10_dir[0]), verify_checksums=False).setup()


def test_data_dir_with_tilde_is_expanded(cifar10_dir, monkeypatch):
    """``data_dir="~/..."`` names the user's home, as for torchvision and every shell tool."""
    root, _, labels, _ = cifar10_dir
    monkeypatch.setenv("HOME", str(root.parent))
    dm = _cifar10(f"~/{root.name}", augment=False, val_fraction=0.0, meta_per_class=0)
    assert dm.data_dir == str(root)
    assert len(dm.train_dataset) == 100
    assert torch.equal(dm.clean_train_targets, labels[dm.train_indices])


CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # the published statistics


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_evaluation_images_are_not_augmented_and_use_the_datasets_statistics(which, cifar10_dir, cifar100_dir):
    """With augment=True only training and meta images are cropped and flipped: validation and test images are
    the stored pixels, normalised with the dataset's own channel statistics (read back through torchvision, the
    on-disk format's reference)."""
    make, root, mean, std = {
        "cifar10": (CIFAR10DataModule, cifar10_dir[0], CIFAR10_MEAN, CIFAR10_STD),
        "cifar100": (CIFAR100DataModule, cifar100_dir[0], CIFAR100_MEAN, CIFAR100_STD),
    }[which]
    dm = make(data_dir=str(root), verify_checksums=False, augment=True, val_fraction=0.2, meta_per_class=1)
    dm.setup()
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def stored(dataset, index):
        return torch.tensor(dataset.data[index], dtype=torch.float32).permute(2, 0, 1) / 255

    pool = dm.train_dataset.dataset.dataset
    raw_test = dm.test_dataset.dataset  # torchvision's reader of the test pickle (without the md5 check)
    assert isinstance(raw_test, torchvision.datasets.CIFAR10) and not raw_test.train
    for i in range(4):
        x = dm.val_dataset[i][0]
        assert torch.allclose(x * std + mean, stored(pool, int(dm.val_indices[i])), atol=1e-5)
        assert torch.equal(dm.val_dataset[i][0], x)
        t = dm.test_dataset[i][0]
        assert torch.allclose(t * std + mean, stored(raw_test, i), atol=1e-5)
    # the meta images are augmented (two reads of the same image differ for some of them)
    assert any(not torch.equal(dm.meta_dataset[i][0], dm.meta_dataset[i][0]) for i in range(10))


def test_training_augmentation_is_a_4_pixel_padded_crop_and_a_fair_horizontal_flip(tmp_path):
    """The CIFAR recipe (He et al. 2016, LDAM-DRW): zero-pad 4 pixels, take a random 32x32 crop, flip left-right with
    probability 1/2. Images with a white left half and a grey right half show both: the zero rows/columns the crop
    brings in (a shift of up to 4 pixels each way) and which side the white half is on."""
    image = np.full((3, 32, 32), 128, dtype=np.uint8)
    image[:, :, :16] = 255
    data = np.tile(image.reshape(1, -1), (10, 1))
    write_cifar10(tmp_path, data, list(range(10)), data, list(range(10)))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), verify_checksums=False, augment=True, val_fraction=0.0,
                           meta_per_class=0)
    dm.setup()
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def edge(zero_lines):  # how many leading entries are True
        return int(torch.cumprod(zero_lines.int(), 0).sum())

    torch.manual_seed(0)
    shifts_y, shifts_x, flips = [], [], 0
    draws = 300
    for k in range(draws):
        pixels = (dm.train_dataset[k % 10][0] * std + mean)[0]  # one channel, values 0 (padding), 128/255, 1
        zero_rows, zero_cols = (pixels.abs() < 1e-3).all(1), (pixels.abs() < 1e-3).all(0)
        shifts_y.append(max(edge(zero_rows), edge(zero_rows.flip(0))))
        shifts_x.append(max(edge(zero_cols), edge(zero_cols.flip(0))))
        white = ((pixels - 1).abs() < 1e-3).nonzero()[:, 1].float().mean()
        grey = ((pixels - 128 / 255).abs() < 1e-3).nonzero()[:, 1].float().mean()
        flips += bool(white > grey)
    assert max(shifts_y) == max(shifts_x) == 4  # P(no shift of 4 in 300 draws) = (7/9)^300
    assert flips / draws == pytest.approx(0.5, abs=0.1)  # sd 0.029
    # evaluation images are the stored ones
    test_pixels = (dm.test_dataset[0][0] * std + mean)[0]
    assert torch.allclose(test_pixels, torch.tensor(image[0], dtype=torch.float32) / 255, atol=1e-5)


def test_corrupted_unverified_files_name_the_folder(cifar10_dir, tmp_path):
    """With verify_checksums=False a truncated, empty or non-pickle file raised pickle's bare error, naming no
    file or folder."""
    import shutil

    root = cifar10_dir[0]
    for name, cut in (("data_batch_2", lambda b: b[:5000]), ("test_batch", lambda b: b"<html>404</html>"),
                      ("batches.meta", lambda b: b"")):
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(root, broken)
        path = broken / "cifar-10-batches-py" / name
        path.write_bytes(cut(path.read_bytes()))
        with pytest.raises(RuntimeError, match=r"files in .*broken_.* are not readable CIFAR python-version"):
            _cifar10(broken)


def test_transforms_set_by_a_subclass_or_the_user_are_kept(cifar10_dir):
    """setup() replaced any train/eval transform with the built-in ones (the base class documents setting them)."""
    root = cifar10_dir[0]

    def ones(image):
        return torch.ones(1)

    class Own(CIFAR10DataModule):
        train_transform = staticmethod(ones)

    dm = Own(data_dir=str(root), verify_checksums=False, meta_per_class=1, val_fraction=0.2)
    dm.setup()
    assert torch.equal(dm.train_dataset[0][0], torch.ones(1)) and torch.equal(dm.meta_dataset[0][0], torch.ones(1))
    assert dm.val_dataset[0][0].shape == (3, 32, 32)  # the built-in evaluation transform
    dm = CIFAR10DataModule(data_dir=str(root), verify_checksums=False, val_fraction=0.2, meta_per_class=1)
    dm.eval_transform = ones
    dm.setup()
    assert torch.equal(dm.test_dataset[0][0], torch.ones(1)) and dm.train_dataset[0][0].shape == (3, 32, 32)
    dm.setup()  # a second setup keeps the built-in training transform and the user's evaluation one
    assert torch.equal(dm.val_dataset[0][0], torch.ones(1)) and dm.train_dataset[0][0].shape == (3, 32, 32)

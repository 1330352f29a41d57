"""CIFAR-10 / CIFAR-100 reweighting datamodules backed by torchvision."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_reweight.data.datamodule import ReweightDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]

_VISION_HINT = 'pip install "lightning-reweight[vision]"'


def _torchvision() -> tuple[Any, Any]:
    try:
        from torchvision import datasets, transforms
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"The CIFAR datamodules need torchvision: {_VISION_HINT}") from err
    return datasets, transforms


_UNVERIFIED: dict[str, type] = {}


def _unverified(name: str) -> type:
    """A subclass of torchvision's ``name`` dataset checking that its files exist but not their md5 sums.

    The classes are created on first use (torchvision is imported lazily) and reachable as module attributes
    ``UnverifiedCIFAR10`` / ``UnverifiedCIFAR100`` (see :func:`__getattr__`), so that datasets built from them
    pickle, e.g. into spawned dataloader workers.
    """
    if name not in _UNVERIFIED:
        datasets, _ = _torchvision()
        base = getattr(datasets, name)

        def _check_integrity(self: Any) -> bool:
            return all(
                os.path.isfile(os.path.join(self.root, self.base_folder, filename))
                for filename, _ in self.train_list + self.test_list
            )

        def _load_meta(self: Any) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as handle:
                self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {label: i for i, label in enumerate(self.classes)}

        cls_name = f"Unverified{name}"
        namespace = {"_check_integrity": _check_integrity, "_load_meta": _load_meta, "__module__": __name__,
                     "__qualname__": cls_name}
        _UNVERIFIED[name] = type(cls_name, (base,), namespace)
    return _UNVERIFIED[name]


def __getattr__(attr: str) -> Any:
    """Create ``UnverifiedCIFAR10`` / ``UnverifiedCIFAR100`` on first access (needs torchvision)."""
    if attr in ("UnverifiedCIFAR10", "UnverifiedCIFAR100"):
        return _unverified(attr.removeprefix("Unverified"))
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


class _CIFARDataModule(ReweightDataModule):
    """Common code of the CIFAR datamodules (subclasses set the torchvision class and statistics)."""

    _dataset_name: str = "CIFAR10"
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        augment: bool = True,
        verify_checksums: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(f"data_dir must be a path, got {type(data_dir).__name__}")
        flags = (("download", download), ("augment", augment), ("verify_checksums", verify_checksums))
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
        self.data_dir = os.path.expanduser(os.fspath(data_dir))
        self.download = download
        self.augment = augment
        self.verify_checksums = verify_checksums
        self._train_raw: Any = None

    def _dataset_class(self) -> type[Any]:
        if not self.verify_checksums:
            return _unverified(self._dataset_name)
        datasets, _ = _torchvision()
        return getattr(datasets, self._dataset_name)

    def _build_transforms(self) -> None:
        """The built-in transforms, for each of ``train_transform`` / ``eval_transform`` not set by the user."""
        _, transforms = _torchvision()
        to_tensor = [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        built = self.__dict__.get("_built_transforms", (None, None))
        if self.eval_transform is None or self.eval_transform is built[0]:
            self.eval_transform = transforms.Compose(to_tensor)
        if self.train_transform is None or self.train_transform is built[1]:
            self.train_transform = transforms.Compose((augmentation if self.augment else []) + to_tensor)
        self._built_transforms = (self.eval_transform, self.train_transform)

    def prepare_data(self) -> None:
        """Download the dataset into ``data_dir`` when ``download=True`` (otherwise do nothing)."""
        if self.download:
            cls = self._dataset_class()
            cls(self.data_dir, train=True, download=True)
            cls(self.data_dir, train=False, download=True)

    def _open(self, train: bool) -> Any:
        cls = self._dataset_class()
        folder = os.path.join(self.data_dir, cls.base_folder)
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing and not self.download:
            raise FileNotFoundError(
                f"{self._dataset_name} files not found in {folder!r} (missing: {', '.join(missing)}). Pass "
                f"download=True to download them, or place the extracted python-version archive "
                f"({cls.filename}) under data_dir={self.data_dir!r}."
            )
        try:
            return cls(self.data_dir, train=train, download=self.download)
        except RuntimeError as err:
            if self.verify_checksums:
                raise RuntimeError(
                    f"{self._dataset_name} files in {folder!r} failed torchvision's md5 check ({err}). "
                    "Re-download them with download=True, or pass verify_checksums=False for modified/subset files."
                ) from err
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError) as err:
            split = "training" if train else "test"
            raise RuntimeError(
                f"{self._dataset_name} {split} files in {folder!r} are not readable CIFAR python-version batches "
                f"({type(err).__name__}: {err}): truncated, empty or of another format; re-extract "
                f"{cls.filename} (or re-download with download=True)"
            ) from err

    def load_train_pool(self) -> tuple[Dataset, Tensor]:
        """The torchvision training set (PIL images) and its labels."""
        self._build_transforms()
        dataset = self._open(train=True)
        return dataset, torch.as_tensor(dataset.targets, dtype=torch.long)

    def load_test_set(self) -> Dataset:
        """The torchvision test set (PIL images)."""
        return self._open(train=False)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50,000 training / 10,000 test 32x32 RGB images, 10 classes) for reweighting experiments.

    Data are read by torchvision's ``CIFAR10`` from ``data_dir/cifar-10-batches-py`` (the python-version
    pickles ``data_batch_1..5``, ``test_batch``, ``batches.meta``). torchvision checks the md5 sum of every
    file; with ``verify_checksums=False`` a subclass of ``CIFAR10`` skips that check (it still requires the
    files to exist), which lets modified or tiny test copies in the same format be read. Inputs are
    normalised with the CIFAR-10 channel mean/std (:attr:`mean`, :attr:`std`); with ``augment=True``
    training and meta images also get a random 32x32 crop with 4-pixel padding and a horizontal flip. A
    ``train_transform`` / ``eval_transform`` that a subclass defines or the user assigns before :meth:`setup`
    replaces the built-in one (``augment`` then concerns only a built-in training transform).

    Long-tailed CIFAR-10 (``imbalance_ratio``): the head class has as many images as the smallest class left after
    the validation and meta splits, so the defaults (10% validation, 10 meta images per class) give 4490 ... 44 at
    ratio 100; ``val_fraction=0, meta_per_class=0`` give the published CIFAR-10-LT, 5000 ... 50 (12,406 images, the
    LDAM-DRW protocol, which evaluates on the test set), as the ``cifar10_lt_*`` configs do.

    Args:
        data_dir: root directory holding (or receiving) ``cifar-10-batches-py``.
        download: download the archive in :meth:`prepare_data` (and when setting up) if missing.
        augment: random crop + flip on training and meta images.
        verify_checksums: let torchvision verify the files' md5 sums.
        **kwargs: forwarded to :class:`~lightning_reweight.data.ReweightDataModule`.

    Raises:
        FileNotFoundError: in :meth:`setup`, when files are missing and ``download=False``.
        RuntimeError: in :meth:`setup`, when a file fails the md5 check or is not a readable CIFAR batch.
        ImportError: in :meth:`setup`/:meth:`prepare_data`, when torchvision is not installed.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="data", noise_rate=0.4, imbalance_ratio=100.0)
        >>> dm.num_classes, dm.input_shape
        (10, (3, 32, 32))
    """

    _dataset_name = "CIFAR10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (50,000 training / 10,000 test images, 100 fine classes) for reweighting experiments.

    Data are read by torchvision's ``CIFAR100`` from ``data_dir/cifar-100-python`` (the pickles ``train``,
    ``test``, ``meta``; labels from ``fine_labels``). ``verify_checksums=False`` skips torchvision's md5 check
    and user-set transforms are kept, as for :class:`CIFAR10DataModule`. Inputs are normalised with the CIFAR-100
    channel mean/std.

    Args:
        data_dir: root directory holding (or receiving) ``cifar-100-python``.
        download: download the archive in :meth:`prepare_data` (and when setting up) if missing.
        augment: random crop + flip on training and meta images.
        verify_checksums: let torchvision verify the files' md5 sums.
        **kwargs: forwarded to :class:`~lightning_reweight.data.ReweightDataModule`.

    Example:
        >>> dm = CIFAR100DataModule(data_dir="data", imbalance_ratio=50.0, meta_per_class=1)
        >>> dm.num_classes
        100
    """

    _dataset_name = "CIFAR100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

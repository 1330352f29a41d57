"""Write tiny CIFAR-10/100 folders in the real on-disk format (python pickles), for the tests."""

import pickle
from pathlib import Path

import numpy as np


def dump(path: Path, obj: dict) -> None:
    """Pickle like the real files: Python 2 pickles whose str keys torchvision reads back as str."""
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def write_cifar10(root: Path, data: np.ndarray, labels: list[int], test_data: np.ndarray, test_labels: list[int],
                  batches: int = 5) -> Path:
    """``root/cifar-10-batches-py`` with ``batches`` training batches, a test batch and the meta file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per = len(labels) // batches
    for b in range(batches):
        rows = slice(per * b, per * (b + 1))
        dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of {batches}",
                                              "data": data[rows], "labels": labels[rows],
                                              "filenames": [f"img{k}.png" for k in range(per)]})
    dump(folder / "test_batch", {"data": test_data, "labels": test_labels})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per, "num_vis": 3072})
    return folder


def write_cifar100(root: Path, data: np.ndarray, fine: list[int], test_data: np.ndarray, test_fine: list[int]) -> Path:
    """``root/cifar-100-python`` with the train, test and meta files."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(folder / "train", {"data": data, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]})
    dump(folder / "test", {"data": test_data, "fine_labels": test_fine, "coarse_labels": [f // 5 for f in test_fine]})
    dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                           "coarse_label_names": [f"s{i}" for i in range(20)]})
    return folder

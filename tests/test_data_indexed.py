"""Dataset wrappers: labels are class indices, never silently truncated."""

import pytest
import torch

from lightning_reweight.data import IndexedDataset, RelabeledSubset, TensorClassificationDataset


def test_integer_valued_float_labels_are_read_as_classes():
    ds = TensorClassificationDataset(torch.zeros(3, 2), torch.tensor([2.0, 0.0, 1.0]))
    assert ds.targets.dtype == torch.int64 and [int(ds[i][1]) for i in range(3)] == [2, 0, 1]
    sub = RelabeledSubset(ds, [2, 0], targets=torch.tensor([1.0, 1.0]))
    assert [int(y) for _, y in sub] == [1, 1]
    assert [i for _, _, i in IndexedDataset(ds)] == [0, 1, 2]


@pytest.mark.parametrize("labels", [[0.0, 1.7, 2.0], [0.5, 1.0, 1.0]])
def test_fractional_labels_are_refused_not_truncated(labels):
    """int(1.7) would be class 1: a soft or regression target passed by mistake must be an error."""
    with pytest.raises(TypeError, match="integer class labels"):
        TensorClassificationDataset(torch.zeros(3, 2), torch.tensor(labels))
    pool = TensorClassificationDataset(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class labels"):
        RelabeledSubset(pool, [0, 1, 2], targets=torch.tensor(labels))


def test_negative_and_misshaped_labels_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        TensorClassificationDataset(torch.zeros(2, 2), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="one-dimensional"):
        TensorClassificationDataset(torch.zeros(2, 2), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="2 labels but inputs has 3 rows"):
        TensorClassificationDataset(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_tensor_dataset_applies_its_transform_to_the_input_only():
    inputs = torch.arange(6.0).view(3, 2)
    ds = TensorClassificationDataset(inputs, torch.tensor([2, 0, 1]), transform=lambda x: 10 * x + 1)
    for i in range(3):
        x, y = ds[i]
        assert torch.equal(x, 10 * inputs[i] + 1) and int(y) == [2, 0, 1][i]


def test_subset_indices_are_checked_against_the_wrapped_dataset():
    """Negative indices wrapped around to the end, fractional ones were truncated, and an out-of-range one made
    ``list(subset)`` silently empty (iteration stops at the IndexError) although ``len`` said otherwise."""
    pool = TensorClassificationDataset(torch.arange(5.0).view(5, 1), torch.tensor([0, 0, 1, 1, 1]))
    for bad, error in (([-1], ValueError), ([7], ValueError), ([5], ValueError), ([0.7], TypeError),
                       (torch.tensor([[0, 1]]), TypeError)):
        with pytest.raises(error, match="indices"):
            RelabeledSubset(pool, bad)
    sub = RelabeledSubset(pool, [4, 0])
    assert [float(x) for x, _ in sub] == [4.0, 0.0] and len(RelabeledSubset(pool, [])) == 0

"""The digits data set: a fixed, disjoint split, standardisation from the training images
only, and an accuracy metric that finds labels by input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from tl_degeneracy.models.digits.data import (  # noqa: E402
    DigitsDataset,
    labelled_accuracy,
    raw_digits,
    split_indices,
)


@pytest.fixture(scope="module")
def data() -> DigitsDataset:
    return DigitsDataset.load(split_seed=0, test_fraction=0.25, dtype=torch.float64)


def test_split_partitions_the_images_and_is_seeded(data):
    both = torch.cat([data.train_indices, data.test_indices]).sort().values
    assert torch.equal(both, torch.arange(1797))
    assert (data.train_inputs.shape, data.test_inputs.shape) == ((1348, 64), (449, 64))
    assert data.train_labels.shape == (1348,) and data.test_labels.dtype == torch.long
    again = DigitsDataset.load(split_seed=0)
    other = DigitsDataset.load(split_seed=1)
    assert torch.equal(again.test_indices, data.test_indices)
    assert not torch.equal(other.test_indices, data.test_indices)
    assert again.split_digest() == data.split_digest() != other.split_digest()
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(10, 1.0, 0)


def test_standardised_with_training_statistics_only(data):
    images, labels = raw_digits()
    train_raw = images[data.train_indices]
    torch.testing.assert_close(data.mean, train_raw.mean(0))
    # each pixel: training mean 0 and (where it varies) training std 1
    torch.testing.assert_close(data.train_inputs.mean(0), torch.zeros(64, dtype=torch.float64))
    std = data.train_inputs.std(0, unbiased=False)
    varies = train_raw.std(0) > 0
    assert (~varies).any()  # the corner pixels are blank on every training image
    torch.testing.assert_close(std[varies], torch.ones(int(varies.sum()), dtype=torch.float64))
    # held-out images use the same statistics, not their own
    expected = (images[data.test_indices] - data.mean) / data.std
    torch.testing.assert_close(data.test_inputs, expected, rtol=0, atol=0)
    assert not torch.allclose(data.test_inputs.mean(0), torch.zeros(64, dtype=torch.float64))
    assert torch.equal(data.test_labels, labels[data.test_indices])


def test_accuracy_metric_looks_labels_up_by_input(data):
    metric = data.accuracy_metric()
    x, y = data.test()
    perfect = torch.nn.functional.one_hot(y, 10).to(torch.float64)
    assert metric(perfect, x).sum() == len(y)
    wrong = torch.nn.functional.one_hot((y + 1) % 10, 10).to(torch.float64)
    assert metric(wrong, x).sum() == 0
    # a position axis: the last position is read; float32 inputs find the same labels
    assert metric(torch.stack([wrong, perfect], 1), x.float()).mean() == 1.0
    with pytest.raises(KeyError, match="not in the labelled data set"):
        metric(perfect[:1], x[:1] + 0.5)
    with pytest.raises(ValueError, match="distinct"):
        labelled_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_to_changes_only_the_input_dtype(data):
    small = data.to(torch.float32)
    assert small.train_inputs.dtype == torch.float32 and small.mean.dtype == torch.float64
    assert torch.equal(small.test_labels, data.test_labels)
    assert small.spec() == data.spec()

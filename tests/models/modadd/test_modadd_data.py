"""The modular-addition data set: input order, labels, splits and metrics."""

from __future__ import annotations

import pytest
import torch

from tl_degeneracy.models.modadd import (
    ModAddDataset,
    accuracy,
    all_inputs,
    all_labels,
    random_split,
)


def test_inputs_and_labels_are_a_major():
    p = 7
    tokens = all_inputs(p)
    expected = torch.tensor([(a, b, p) for a in range(p) for b in range(p)])
    assert torch.equal(tokens, expected)
    assert torch.equal(all_labels(p), (expected[:, 0] + expected[:, 1]) % p)


def test_random_split_is_deterministic_and_partitions():
    train, test = random_split(113, 0.3, seed=0)
    assert train.numel() == 3830 and test.numel() == 8939  # the reference's sizes
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(113 * 113))
    again, _ = random_split(113, 0.3, seed=0)
    other, _ = random_split(113, 0.3, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    with pytest.raises(ValueError):
        random_split(5, 1.0, 0)


def test_split_file_roundtrip_and_validation(tmp_path):
    ds = ModAddDataset.random(11, 0.5, seed=3)
    ds.save_split(tmp_path / "split.safetensors")
    back = ModAddDataset.from_split_file(tmp_path / "split.safetensors")
    assert back.p == 11 and torch.equal(back.train_indices, ds.train_indices)
    assert back.frac_train == pytest.approx(60 / 121)
    x, y = back.test()
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % 11) and torch.all(x[:, 2] == 11)
    with pytest.raises(ValueError):
        ModAddDataset(11, ds.train_indices, ds.test_indices[:-1])
    with pytest.raises(ValueError):
        ModAddDataset.from_split_file(tmp_path / "split.safetensors", p=13)


def test_accuracy_reads_the_last_position():
    labels = torch.tensor([1, 2, 0])
    logits = torch.zeros(3, 3, 4)
    logits[torch.arange(3), -1, labels] = 1.0
    logits[:, 0, 3] = 5.0  # earlier positions are ignored
    assert accuracy(logits, labels) == 1.0
    logits[0, -1, 3] = 2.0
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    assert accuracy(logits[:, -1], labels) == pytest.approx(2 / 3)

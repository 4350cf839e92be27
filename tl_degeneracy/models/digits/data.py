"""scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes) with a fixed split.

The images ship inside the scikit-learn wheel, so nothing is downloaded. The split is a
deterministic permutation from `split_seed` (a private `torch.Generator`); each pixel is
standardised with the mean and standard deviation of the *training* images only (a pixel that
is constant on the training set keeps a scale of 1), so held-out images never inform the
inputs the model or the bases see.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

N_IMAGES = 1797
N_PIXELS = 64
N_CLASSES = 10


def raw_digits() -> tuple[Float[Tensor, "1797 64"], Int[Tensor, " 1797"]]:
    """All images (pixel values 0…16, float64) and labels, in scikit-learn's order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as missing:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the digits data set comes with scikit-learn: pip install 'tl_degeneracy[digits]'"
        ) from missing
    bunch = load_digits()
    return torch.from_numpy(bunch.data).to(torch.float64), torch.from_numpy(bunch.target).long()


def split_indices(
    n: int, test_fraction: float, seed: int
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """A deterministic split of `range(n)`: the last `round(test_fraction · n)` of a seeded
    permutation are held out. The global RNG is untouched."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * n)
    return order[: n - n_test].sort().values, order[n - n_test :].sort().values


@dataclass(frozen=True)
class DigitsDataset:
    """Standardised images `[n, 64]` and labels `[n]`, split into train and held-out.

    `mean` and `std` are the per-pixel statistics of the raw training images that every image
    was standardised with: `x = (raw - mean) / std`.
    """

    train_inputs: Float[Tensor, "n_train 64"]
    train_labels: Int[Tensor, " n_train"]
    test_inputs: Float[Tensor, "n_test 64"]
    test_labels: Int[Tensor, " n_test"]
    mean: Float[Tensor, " 64"]
    std: Float[Tensor, " 64"]
    split_seed: int
    test_fraction: float
    train_indices: Int[Tensor, " n_train"]
    test_indices: Int[Tensor, " n_test"]

    @classmethod
    def load(
        cls,
        split_seed: int = 0,
        test_fraction: float = 0.25,
        dtype: torch.dtype = torch.float32,
    ) -> DigitsDataset:
        """The digits with a split from `split_seed`, standardised by training statistics."""
        images, labels = raw_digits()
        train_idx, test_idx = split_indices(images.shape[0], test_fraction, split_seed)
        train_raw = images[train_idx]
        mean = train_raw.mean(0)
        std = train_raw.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))

        def standardise(raw: Tensor) -> Tensor:
            return ((raw - mean) / std).to(dtype)

        return cls(
            standardise(train_raw),
            labels[train_idx],
            standardise(images[test_idx]),
            labels[test_idx],
            mean,
            std,
            split_seed,
            test_fraction,
            train_idx,
            test_idx,
        )

    def to(self, dtype: torch.dtype) -> DigitsDataset:
        """The same data with inputs in `dtype` (labels and statistics unchanged)."""
        return DigitsDataset(
            self.train_inputs.to(dtype),
            self.train_labels,
            self.test_inputs.to(dtype),
            self.test_labels,
            self.mean,
            self.std,
            self.split_seed,
            self.test_fraction,
            self.train_indices,
            self.test_indices,
        )

    def train(self) -> tuple[Float[Tensor, "n_train 64"], Int[Tensor, " n_train"]]:
        return self.train_inputs, self.train_labels

    def test(self) -> tuple[Float[Tensor, "n_test 64"], Int[Tensor, " n_test"]]:
        return self.test_inputs, self.test_labels

    def split_digest(self) -> str:
        """A short hash of the held-out indices: a checkpoint records it, so a changed split
        (another scikit-learn or torch) is caught when the checkpoint is loaded."""
        return hashlib.sha256(self.test_indices.numpy().tobytes()).hexdigest()[:16]

    def spec(self) -> dict:
        """What determines the data set (stored in a checkpoint's config.json)."""
        return {
            "name": "sklearn.datasets.load_digits",
            "split_seed": self.split_seed,
            "test_fraction": self.test_fraction,
            "n_train": int(self.train_labels.numel()),
            "n_test": int(self.test_labels.numel()),
            "standardisation": "per pixel, training mean and std (std 0 -> 1)",
            "split_digest": self.split_digest(),
        }

    def accuracy_metric(self) -> Callable[[Tensor, Tensor], Tensor]:
        """A metric `(logits, inputs) -> [batch]` of 0/1 correctness for the engine's ablation
        functions, which pass the inputs but not the labels: each input row is looked up by
        its value (the 1,797 images are distinct). Logits may be `[batch, 10]` or carry a
        position axis (`[batch, 1, 10]`), of which the last position is read."""
        return labelled_accuracy(
            torch.cat([self.train_inputs, self.test_inputs]),
            torch.cat([self.train_labels, self.test_labels]),
        )


def _row_key(row: Tensor) -> bytes:
    # float32 bytes: the same image in float32 or float64 maps to one key
    return row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def labelled_accuracy(
    inputs: Float[Tensor, "n d"], labels: Int[Tensor, " n"]
) -> Callable[[Tensor, Tensor], Tensor]:
    """An accuracy metric over known `(inputs, labels)` pairs, labels found by input value."""
    table = {_row_key(x): int(y) for x, y in zip(inputs, labels)}
    if len(table) != inputs.shape[0]:
        raise ValueError("inputs are not distinct: labels cannot be looked up by value")

    def metric(logits: Tensor, batch: Tensor) -> Tensor:
        try:
            target = torch.tensor([table[_row_key(x)] for x in batch], device=logits.device)
        except KeyError:
            raise KeyError("an input of this batch is not in the labelled data set") from None
        scores = logits[:, -1] if logits.ndim == 3 else logits
        return (scores.argmax(-1) == target).to(torch.float64)

    metric.last_position_only = True  # type: ignore[attr-defined]
    return metric

"""The modular-addition data set: every input `[a, b, =]` with label `(a + b) mod p`.

Inputs are ordered `[(a, b, p) for a in range(p) for b in range(p)]` (the `=` token is `p`),
the order the reference split indexes and the order `models.modadd.fourier` expects. The split
is the reference's own (`split.safetensors`) when one is given, else a deterministic random
split from `frac_train` and `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor


def all_inputs(p: int) -> Int[Tensor, "p_sq 3"]:
    """All p² token sequences `[a, b, p]`, a-major."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    return torch.stack([a, b, torch.full_like(a, p)], dim=1)


def all_labels(p: int) -> Int[Tensor, " p_sq"]:
    """`(a + b) mod p` for every input of `all_inputs(p)`."""
    tokens = all_inputs(p)
    return (tokens[:, 0] + tokens[:, 1]) % p


def random_split(
    p: int, frac_train: float, seed: int
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Deterministic split of the p² inputs: `⌊frac_train · p²⌋` training indices, the rest test.

    Uses its own `torch.Generator`, so the global RNG is untouched and the split is the same on
    every machine for a given torch version.
    """
    if not 0.0 < frac_train < 1.0:
        raise ValueError(f"frac_train must be in (0, 1), got {frac_train}")
    n = p * p
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(frac_train * n)
    return order[:n_train].clone(), order[n_train:].clone()


@dataclass(frozen=True)
class ModAddDataset:
    """All inputs and labels for one modulus, with a train/test split (indices into them)."""

    p: int
    train_indices: Int[Tensor, " n_train"]
    test_indices: Int[Tensor, " n_test"]

    def __post_init__(self) -> None:
        n = self.p * self.p
        both = torch.cat([self.train_indices, self.test_indices])
        if both.numel() != n or not torch.equal(both.sort().values, torch.arange(n)):
            raise ValueError(f"train and test indices must partition range({n})")

    @classmethod
    def random(cls, p: int, frac_train: float = 0.3, seed: int = 0) -> ModAddDataset:
        """A deterministic split of our own (see `random_split`)."""
        return cls(p, *random_split(p, frac_train, seed))

    @classmethod
    def from_split_file(cls, path: str | Path, p: int | None = None) -> ModAddDataset:
        """The split stored in `split.safetensors` (`train_indices`, `test_indices`)."""
        try:
            split = load_file(str(path))
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not a safetensors file ({error}): a truncated copy, or another "
                "format (pickles are never loaded); copy it again, or write it with "
                "ModAddDataset.save_split(path)"
            ) from error
        missing = [k for k in ("train_indices", "test_indices") if k not in split]
        if missing:
            raise ValueError(
                f"{path} has no {' or '.join(repr(k) for k in missing)} (it holds "
                f"{sorted(split)}); write it with ModAddDataset.save_split(path)"
            )
        train, test = split["train_indices"].long(), split["test_indices"].long()
        n = train.numel() + test.numel()
        p_from_file = round(n**0.5)
        if p_from_file * p_from_file != n or (p is not None and p != p_from_file):
            raise ValueError(f"{path}: {n} indices do not fit p={p}")
        return cls(p_from_file, train, test)

    def save_split(self, path: str | Path) -> None:
        """Write the split in the reference format."""
        save_file(
            {
                "train_indices": self.train_indices.contiguous(),
                "test_indices": self.test_indices.contiguous(),
            },
            str(path),
        )

    @property
    def tokens(self) -> Int[Tensor, "p_sq 3"]:
        return all_inputs(self.p)

    @property
    def labels(self) -> Int[Tensor, " p_sq"]:
        return all_labels(self.p)

    @property
    def frac_train(self) -> float:
        return self.train_indices.numel() / (self.p * self.p)

    def train(self) -> tuple[Int[Tensor, "n_train 3"], Int[Tensor, " n_train"]]:
        """Training tokens and labels."""
        return self.tokens[self.train_indices], self.labels[self.train_indices]

    def test(self) -> tuple[Int[Tensor, "n_test 3"], Int[Tensor, " n_test"]]:
        """Test tokens and labels."""
        return self.tokens[self.test_indices], self.labels[self.test_indices]


def last_logits(
    logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"], p: int | None = None
) -> Float[Tensor, "batch classes"]:
    """Logits at the last position, restricted to the `p` residue classes when `p` is given."""
    if logits.ndim == 3:
        logits = logits[:, -1]
    return logits if p is None else logits[:, :p]


def accuracy(
    logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"],
    labels: Int[Tensor, " batch"],
) -> float:
    """Fraction of inputs whose last-position argmax (over the whole output vocabulary) is the
    label."""
    return (last_logits(logits).argmax(dim=-1) == labels).double().mean().item()


def cross_entropy(
    logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"],
    labels: Int[Tensor, " batch"],
) -> Tensor:
    """Mean cross-entropy of the last-position logits (whole output vocabulary), in float64."""
    return F.cross_entropy(last_logits(logits).to(torch.float64), labels)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: Int[Tensor, "batch 3"],
    labels: Int[Tensor, " batch"],
    batch_size: int = 4096,
) -> dict[str, float]:
    """Accuracy and loss of a TransformerLens model (either API) on the given inputs."""
    correct, loss_sum = 0.0, 0.0
    for start in range(0, tokens.shape[0], batch_size):
        logits = model(tokens[start : start + batch_size])
        y = labels[start : start + batch_size]
        correct += (last_logits(logits).argmax(-1) == y).sum().item()
        loss_sum += cross_entropy(logits, y).item() * y.numel()
    n = tokens.shape[0]
    return {"accuracy": correct / n, "loss": loss_sum / n}


@torch.no_grad()
def activations_on_all_inputs(
    model: torch.nn.Module, hook_names: list[str], p: int, batch_size: int = 4096
) -> dict[str, Float[Tensor, "p_sq pos d"]]:
    """Activations at the named hook points on all p² inputs (a-major), keyed by the names
    given, on either API; the input to `tl_degeneracy.models.modadd.fourier.fourier_labels`."""
    from tl_degeneracy.engine.compat import run_with_hooks

    tokens = all_inputs(p)
    out: dict[str, list[Tensor]] = {name: [] for name in hook_names}

    def keep(name: str):
        def hook(act: Tensor, hook=None) -> None:
            out[name].append(act.detach().clone())

        return hook

    for start in range(0, tokens.shape[0], batch_size):
        run_with_hooks(
            model, tokens[start : start + batch_size], [(n, keep(n)) for n in hook_names]
        )
    return {name: torch.cat(chunks) for name, chunks in out.items()}

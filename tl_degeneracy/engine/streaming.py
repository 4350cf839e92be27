"""Streaming over token batches with progress, periodic checkpoints and resume.

Every statistic of the package is an accumulator: `update(batch_index, tokens)` folds one
batch in, `state_dict()`/`load_state_dict()` save and restore it. `stream` drives one over the
data, writes a checkpoint every few batches, and on a restart skips the batches already in it,
so a killed run resumes and ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm


@runtime_checkable
class Accumulator(Protocol):
    def update(self, batch_index: int, tokens: Int[Tensor, "batch pos"]) -> None: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class EmptyDataError(ValueError):
    """No data reached an accumulator."""


def iter_batches(
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    batch_size: int = 256,
    model: nn.Module | None = None,
) -> list[Tensor]:
    """Split a token tensor (or any model's inputs, batch first) into batches, or pass an
    iterable of batches through as a list. With `model`, each batch is checked against it
    (`tokens.validate_tokens`: ids in the vocabulary, length within the context) and moved to
    its device."""
    if isinstance(tokens, Tensor):
        if tokens.ndim < 1 or tokens.shape[0] == 0:
            raise EmptyDataError("no data: the token tensor has zero rows")
        batches = list(tokens.split(batch_size))
    else:
        batches = list(tokens)
    if not batches:
        raise EmptyDataError("no data: the batch iterable is empty")
    if model is None:
        return batches
    from tl_degeneracy.engine.tokens import validate_tokens

    return [validate_tokens(model, b) for b in batches]


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a long computation saves its state."""

    path: str | os.PathLike
    every: int = 10
    """Save after every `every` batches."""


def _save_checkpoint(path: Path, key: str, done: int, state: dict[str, Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f"{key}.safetensors.tmp"
    # The batch count travels inside the state file, so that one atomic replace updates both
    # (the JSON beside it is for people; a kill between the two replaces used to resume with
    # the new state and the old count, folding the last batches in twice).
    meta = {"batches_done": str(done)}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path / f"{key}.safetensors")
    meta_path = path / f"{key}.json"
    tmp_meta = path / f"{key}.json.tmp"
    tmp_meta.write_text(json.dumps({"batches_done": done}))
    os.replace(tmp_meta, meta_path)


def _load_checkpoint(path: Path, key: str) -> tuple[int, dict[str, Tensor]] | None:
    meta, tensors = path / f"{key}.json", path / f"{key}.safetensors"
    if not tensors.exists():
        return None
    with safe_open(str(tensors), "pt") as f:
        stored = (f.metadata() or {}).get("batches_done")
    if stored is None:  # a checkpoint written before the count moved into the state file
        if not meta.exists():
            return None
        stored = json.loads(meta.read_text())["batches_done"]
    return int(stored), load_file(str(tensors))


def stream(
    accumulator: Accumulator,
    batches: list[Tensor],
    description: str,
    checkpoint: Checkpointing | None = None,
    key: str = "state",
    progress: bool = True,
) -> Accumulator:
    """Fold every batch into `accumulator`, with a progress bar (tokens/s and ETA).

    With `checkpoint`, the state is saved every `checkpoint.every` batches under `key` and a
    previous run's state is resumed from.
    """
    start = 0
    ckpt_dir = Path(checkpoint.path) if checkpoint else None
    if ckpt_dir is not None:
        loaded = _load_checkpoint(ckpt_dir, key)
        if loaded is not None:
            start, state = loaded
            accumulator.load_state_dict(state)
    n_tokens = sum(int(b.numel()) for b in batches)
    bar = tqdm(
        total=n_tokens,
        desc=description,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        initial=sum(int(b.numel()) for b in batches[:start]),
    )
    for i in range(start, len(batches)):
        accumulator.update(i, batches[i])
        bar.update(int(batches[i].numel()))
        if ckpt_dir is not None and checkpoint is not None:
            if (i + 1) % checkpoint.every == 0 or i + 1 == len(batches):
                _save_checkpoint(ckpt_dir, key, i + 1, accumulator.state_dict())
    bar.close()
    return accumulator


def batch_generator(
    seed: int, *parts: int | str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded by `seed` and a batch's identity, so stochastic estimates do not
    depend on where a run was interrupted or how it was sharded. On a GPU it draws there
    (reproducible per device; a CPU and a GPU run draw different signs)."""
    text = "/".join(str(p) for p in (seed, *parts))
    h = 1469598103934665603
    for ch in text.encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 63)
    return torch.Generator(device=device).manual_seed(h)


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def claim_checkpoint_folder(
    folder: str | os.PathLike, settings: dict, barrier: Callable[[], None] | None = None
) -> Path:
    """Stamp `folder` with a fingerprint of `settings` (JSON data: config, model identity,
    sites, a digest of the data), or check the stamp a previous run left: a folder written by
    a run of other settings, model or data is refused rather than resumed silently. With
    several processes, rank 0 writes the stamp between two `barrier()` calls."""
    import hashlib

    folder = Path(folder)
    text = json.dumps(settings, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:20]
    stamp = folder / "fingerprint.json"
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved.get("fingerprint") != fingerprint:
            differs = [
                k
                for k in settings
                if saved.get("settings", {}).get(k) != jsonable_roundtrip(settings[k])
            ]
            raise ValueError(
                f"checkpoint folder {folder} was written by a run with other settings "
                f"({', '.join(differs) or 'fingerprint'} differ); use a new folder or delete it"
            )
        return folder
    if barrier is not None:
        barrier()
    if barrier is None or int(os.environ.get("RANK", "0")) == 0:
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(
            json.dumps({"fingerprint": fingerprint, "settings": settings}, default=str)
        )
    if barrier is not None:
        barrier()
    return folder


def jsonable_roundtrip(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def data_digest(batches: Iterable[Tensor]) -> str:
    """A digest of the data (token ids or inputs), for checkpoint fingerprints."""
    import hashlib

    h = hashlib.sha256()
    for batch in batches:
        h.update(batch.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

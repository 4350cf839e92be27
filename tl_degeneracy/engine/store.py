"""Where a section's input activation comes from: an activation store or a forward pass.

Structures that run one block or a closed form (see `engine.structures`) need the input site's
activation at every position, not the tokens. The Gram pass already computes it, so the fit
keeps it in an `ActivationStore` (in memory, or on disk when it would not fit) and every later
pass over the data reads it back instead of re-running the model's prefix: for a 30-block
language model that prefix is half a forward per section, thirty forwards per pass.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tl_degeneracy.engine.capture import capture_sites
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.engine.streaming import CheckpointDamagedError

Kind = tuple[str, int, tuple[int, ...]]
"""What every stored batch of a site shares: dtype, rank and the shape past (batch, pos)."""


class ActivationStore:
    """Site activations (every position, the model's dtype) per batch index, kept in memory
    (`root=None`) or on disk (one safetensors file per site and batch, each written to a
    temporary name and renamed, so a kill never leaves a partial file under a batch's name).
    A disk store in a checkpoint folder outlives an interrupted run (`FitState.close`); the
    folder's fingerprint guarantees that the resumed run has the same model and data."""

    def __init__(self, root: str | Path | None = None, batch_rows: int | None = None):
        self.root = None if root is None else Path(root)
        self.batch_rows = batch_rows
        self._memory: dict[tuple[str, int], Tensor] = {}
        self._kinds: dict[str, Kind | None] = {}

    def _path(self, hook: str, batch_index: int) -> Path:
        assert self.root is not None
        return self.root / hook / f"{batch_index:07d}.safetensors"

    def write(self, site: Site, batch_index: int, act: Tensor) -> None:
        act = act.detach()
        if self.root is None:
            self._memory[(site.hook, batch_index)] = act.clone()
            return
        path = self._path(site.hook, batch_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"act": act.contiguous().cpu()}, str(tmp))
        tmp.replace(path)

    def get(self, site: Site, batch_index: int, device: torch.device) -> Tensor | None:
        """The stored activation, or None. A file that cannot be read, lacks its tensor or
        differs in dtype or width from most of its site's batches is refused
        (`CheckpointDamagedError`), never returned."""
        if self.root is None:
            return self._memory.get((site.hook, batch_index))
        path = self._path(site.hook, batch_index)
        if not path.exists():
            return None
        kind, act = _read(path, device)
        if site.hook not in self._kinds:
            self._kinds[site.hook] = self._usual_kind(site.hook)
        usual = self._kinds[site.hook]
        if usual is not None and kind != usual:
            raise damaged_batch(
                path, f"it holds {_show(kind)}, its site's other batches {_show(usual)}"
            )
        return act

    def _usual_kind(self, hook: str) -> Kind | None:
        """The kind most of a site's stored batches share (None: no majority), from their
        headers alone."""
        kinds: Counter[Kind] = Counter()
        for path in (self.root / hook).glob("*.safetensors") if self.root else []:
            try:
                with safe_open(str(path), "pt") as f:
                    if "act" in f.keys():
                        part = f.get_slice("act")
                        kinds[_kind(part.get_dtype(), part.get_shape())] += 1
            except (SafetensorError, OSError, ValueError, RuntimeError):
                continue  # refused when it is read
        if not kinds:
            return None
        kind, n = kinds.most_common(1)[0]
        return kind if 2 * n > sum(kinds.values()) else None

    def drop(self, site: Site) -> None:
        """Forget a site once no later pass needs it."""
        for key in [k for k in self._memory if k[0] == site.hook]:
            del self._memory[key]
        self._kinds.pop(site.hook, None)
        if self.root is not None:
            shutil.rmtree(self.root / site.hook, ignore_errors=True)

    def clear(self) -> None:
        self._memory.clear()
        self._kinds.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _kind(dtype: str, shape: list[int]) -> Kind:
    return dtype, len(shape), tuple(shape[2:])


def _show(kind: Kind) -> str:
    dtype, rank, rest = kind
    return f"{dtype} of rank {rank}, [batch, pos, {', '.join(map(str, rest))}]"


def damaged_batch(path: Path, problem: str) -> CheckpointDamagedError:
    """The refusal of a stored batch: deleting it recomputes that batch from the model."""
    return CheckpointDamagedError(
        path,
        problem,
        f"delete {path} (that batch's activation is then computed again from the model), or "
        "run again without resuming (another folder, another --out on the command line)",
    )


def _read(path: Path, device: torch.device) -> tuple[Kind, Tensor]:
    """A stored batch's kind and activation; never unpickles (safetensors only)."""
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            names = list(f.keys())
            if "act" in names:
                part = f.get_slice("act")
                kind = _kind(part.get_dtype(), part.get_shape())
                act = f.get_tensor("act")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise damaged_batch(path, f"it is not a readable safetensors file ({error})") from error
    if "act" not in names:
        raise damaged_batch(path, f"it holds {names}, not the tensor 'act'")
    if kind[1] < 3 or not act.is_floating_point():
        raise damaged_batch(path, f"it holds {_show(kind)}, not a float [batch, pos, ...]")
    return kind, act


class ActivationSource:
    """A site's full activation for a batch: from the store when it holds it, else from a
    forward pass that stops at the site (stored when it is a whole batch, so a resumed run
    refills a store lost with the process)."""

    def __init__(self, model: nn.Module, store: ActivationStore | None = None):
        self.model, self.store = model, store

    def activation(self, site: Site, batch_index: int, inputs: Tensor) -> Tensor:
        """`[batch, pos, d]` at every position (all parts of a composite site). `inputs` may
        be the first rows of a stored batch (edges on a slice of the data). A stored entry
        with fewer rows than `inputs`, or other positions than its tokens, is not this batch's
        (a store left by other data) and is recomputed rather than returned short."""
        if self.store is not None:
            device = inputs.device
            act = self.store.get(site, batch_index, device)
            tokens = inputs.ndim == 2 and not inputs.is_floating_point()
            if (
                act is not None
                and act.shape[0] >= inputs.shape[0]
                and (not tokens or act.shape[1] == inputs.shape[1])
            ):
                return act if act.shape[0] == inputs.shape[0] else act[: inputs.shape[0]]
        (act,) = capture_sites(self.model, inputs, [site], batch_index, all_positions=True)
        if self.store is not None and inputs.shape[0] == self.store.batch_rows:
            self.store.write(site, batch_index, act)
        return act

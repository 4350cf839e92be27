"""Where a section's input activation comes from: an activation store or a forward pass.

Structures that run one block or a closed form (see `engine.structures`) need the input site's
activation at every position, not the tokens. The Gram pass already computes it, so the fit
keeps it in an `ActivationStore` (in memory, or on disk when it would not fit) and every later
pass over the data reads it back instead of re-running the model's prefix: for a 30-block
language model that prefix is half a forward per section, thirty forwards per pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tl_degeneracy.engine.capture import capture_sites
from tl_degeneracy.engine.sites import Site


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
        if self.root is None:
            return self._memory.get((site.hook, batch_index))
        path = self._path(site.hook, batch_index)
        return load_file(str(path), device=str(device))["act"] if path.exists() else None

    def drop(self, site: Site) -> None:
        """Forget a site once no later pass needs it."""
        for key in [k for k in self._memory if k[0] == site.hook]:
            del self._memory[key]
        if self.root is not None:
            shutil.rmtree(self.root / site.hook, ignore_errors=True)

    def clear(self) -> None:
        self._memory.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


class ActivationSource:
    """A site's full activation for a batch: from the store when it holds it, else from a
    forward pass that stops at the site (stored when it is a whole batch, so a resumed run
    refills a store lost with the process)."""

    def __init__(self, model: nn.Module, store: ActivationStore | None = None):
        self.model, self.store = model, store

    def activation(self, site: Site, batch_index: int, inputs: Tensor) -> Tensor:
        """`[batch, pos, d]` at every position (all parts of a composite site). `inputs` may
        be the first rows of a stored batch (edges on a slice of the data). A stored entry
        with fewer rows than `inputs` is not this batch's (a store left by other data) and is
        recomputed rather than returned short."""
        if self.store is not None:
            device = inputs.device
            act = self.store.get(site, batch_index, device)
            if act is not None and act.shape[0] >= inputs.shape[0]:
                return act if act.shape[0] == inputs.shape[0] else act[: inputs.shape[0]]
        (act,) = capture_sites(self.model, inputs, [site], batch_index, all_positions=True)
        if self.store is not None and inputs.shape[0] == self.store.batch_rows:
            self.store.write(site, batch_index, act)
        return act

"""Edge-ablation outputs of a section whose output features split into a part linear in the
kept inputs and a non-linear part reached through a *state* (an MLP's pre-activations, an
attention block's queries and keys), shared by the closed-form structures.

Rows of the mask are grouped by content and visited along a short path (`row_path`): each state
is reached from the previous row's, the empty row's or the full row's by adding and removing the
inputs that differ, so a mask costs about as many input rows as its rows differ, not as many as
they keep. Each row's non-linear part is remembered across masks (a bisection revisits most rows
unchanged), up to `cache_bytes`.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor


class StatefulRows:
    """Subclasses define `_linear`, `_state`, `_move` and `_read`."""

    cache_bytes: int = 256 * 2**20

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._cache: dict[tuple[int, bytes], Tensor] = {}
        self._cached_bytes = 0

    def _linear(self, mask: Bool[Tensor, "k_out k_in"]) -> Float[Tensor, "batch p_out k_out"]:
        raise NotImplementedError

    def _state(self, full: bool) -> tuple[Tensor, ...]:
        """The state with no input kept, or with every input kept."""
        raise NotImplementedError

    def _move(self, state: tuple[Tensor, ...], add: Tensor, remove: Tensor) -> tuple[Tensor, ...]:
        """The state with the inputs `add` kept and `remove` dropped besides."""
        raise NotImplementedError

    def _read(
        self, state: tuple[Tensor, ...], row: Bool[Tensor, " k_in"], outputs: list[int]
    ) -> Float[Tensor, "batch p_out n"]:
        """The non-linear part of `outputs`, which all have mask row `row` and this state."""
        raise NotImplementedError

    def outputs(self, mask: Bool[Tensor, "k_out k_in"]) -> Float[Tensor, "batch p_out k_out"]:
        mask = mask.to(self.device)
        out = self._linear(mask)
        cpu_mask = mask.cpu()
        groups: dict[bytes, list[int]] = {}
        for i in range(cpu_mask.shape[0]):
            key = cpu_mask[i].numpy().tobytes()
            hit = self._cache.get((i, key))
            if hit is not None:
                out[..., i] += hit
            else:
                groups.setdefault(key, []).append(i)
        if not groups:
            return out
        rows = list(groups.values())
        masks = torch.stack([mask[r[0]] for r in rows])  # distinct rows
        cpu_masks = masks.cpu()
        state, current = None, None
        for r, start in row_path(cpu_masks):
            if start is not None:
                state = self._state(full=start)
                current = torch.full_like(masks[r], start)
            assert state is not None and current is not None
            add = (masks[r] & ~current).nonzero()[:, 0]
            remove = (current & ~masks[r]).nonzero()[:, 0]
            state, current = self._move(state, add, remove), masks[r]
            values = self._read(state, masks[r], rows[r])
            key = cpu_masks[r].numpy().tobytes()
            for n, i in enumerate(rows[r]):
                out[..., i] += values[..., n]
                self._remember((i, key), values[..., n].clone())
        return out

    def _remember(self, key: tuple[int, bytes], value: Tensor) -> None:
        size = value.numel() * value.element_size()
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            old = self._cache.pop(next(iter(self._cache)))  # first in, first out
            self._cached_bytes -= old.numel() * old.element_size()
        if size <= self.cache_bytes:
            self._cache[key] = value
            self._cached_bytes += size


def row_path(masks: Bool[Tensor, "rows k_in"]) -> list[tuple[int, bool | None]]:
    """An order to visit distinct mask rows, each with where its state comes from: `None`
    (the previous row's state), `False` (the empty row's) or `True` (the full row's).

    Greedy nearest neighbour on the Hamming distance: the next row is the unvisited one
    closest to the current row, to the empty row or to the full row.
    """
    m = masks.to(torch.float64)
    k_in = m.shape[1]
    kept = m.sum(1)
    between = kept[:, None] + kept[None, :] - 2 * (m @ m.T)  # Hamming distances
    from_empty, from_full = kept, k_in - kept
    todo = torch.ones(len(m), dtype=torch.bool)
    path: list[tuple[int, bool | None]] = []
    current = None
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    while bool(todo.any()):
        restart = torch.minimum(from_empty, from_full)
        near = between[current] if current is not None else restart + 1
        cost = torch.where(todo, torch.minimum(near, restart), inf)
        r = int(cost.argmin())
        if current is not None and near[r] <= restart[r]:
            path.append((r, None))
        else:
            path.append((r, bool(from_full[r] < from_empty[r])))
        todo[r] = False
        current = r
    return path


def shift(
    state: Float[Tensor, "n width"],
    inputs_t: Float[Tensor, "k_in n"],
    proj: Float[Tensor, "k_in width"],
    add: Tensor,
    remove: Tensor,
) -> Float[Tensor, "n width"]:
    """`state + inputs[:, add] @ proj[add] − inputs[:, remove] @ proj[remove]` in one
    product (inputs stored transposed, so that the rows gathered are contiguous)."""
    if len(add) + len(remove) == 0:
        return state
    idx = torch.cat([add, remove])
    rows = inputs_t[idx]
    if len(remove):
        rows[len(add) :] *= -1
    return torch.addmm(state, rows.T, proj[idx])


def smaller_side(row: Bool[Tensor, " k_in"]) -> tuple[bool, Tensor]:
    """For one mask row: whether to add the kept inputs to the all-dropped value (True) or
    subtract the dropped ones from the all-kept value (False), and those inputs' indices."""
    n_kept = int(row.sum())
    if 2 * n_kept <= row.numel():
        return True, row.nonzero()[:, 0]
    return False, (~row).nonzero()[:, 0]

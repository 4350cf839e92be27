"""Statistics over several processes with `torch.distributed` (gloo on CPU, NCCL on CUDA).

Each rank streams its shard of the batches (batch `i` goes to rank `i mod world_size`) under
the batch's *global* index, so stochastic sources, which are seeded per batch, are the same as
in a single process. The ranks' accumulator states are then all-gathered and merged in rank
order, so every rank holds the same, deterministic result: Gram statistics merge with Chan's
formula, Jacobian Grams and edges are sums. Merged results equal a one-process run to float64
rounding.

Every pass of the fit pipeline (`engine.fit`) and of the edges takes a `DistContext`; launch
the `fit` command with `torchrun` (one machine or several, see docs/distributed.md):

    torchrun --nproc_per_node 2 -m tl_degeneracy.cli fit --model smollm2 ...
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tl_degeneracy.engine.statistics import GramStatistics
from tl_degeneracy.engine.streaming import (
    Accumulator,
    Checkpointing,
    EmptyDataError,
    saved_batches,
    stream,
)


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process; `DistContext()` is a single process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
        """Join the process group `torchrun` describes in the environment (RANK, WORLD_SIZE,
        MASTER_ADDR, MASTER_PORT); a single process when WORLD_SIZE is unset or 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, n_batches: int) -> list[int]:
        """Global indices of the batches this rank processes: `rank, rank + world, ...`."""
        return list(range(self.rank, n_batches, self.world_size))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def all_gather_states(state: dict[str, Tensor], ctx: DistContext) -> list[dict[str, Tensor]]:
    """Every rank's state dict, in rank order (the state itself in a single process)."""
    if not ctx.active:
        return [state]
    cpu = {k: v.detach().cpu() for k, v in state.items()}
    gathered: list[dict[str, Tensor] | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, cpu)
    return [g for g in gathered if g is not None]


def sum_states(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Key-wise sum of additive states (counts, Jacobian Gram sums, edge sums), in order.

    A key missing on a rank (a rank without data) counts as zero."""
    keys: list[str] = []
    for s in states:
        keys += [k for k in s if k not in keys]
    return {k: _sum_in_order([s[k] for s in states if k in s]) for k in keys}


def _sum_in_order(tensors: list[Tensor]) -> Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out


def merge_gram_states(
    states: Sequence[dict[str, Tensor]], stats: GramStatistics, device: str | torch.device = "cpu"
) -> GramStatistics:
    """Chan-merge per-rank Gram states into `stats`' sites, in rank order; ranks without
    data are skipped."""
    merged: GramStatistics | None = None
    for state in states:
        if not state:
            continue
        part = GramStatistics(list(stats.sites))
        part.load_state_dict(state, device)
        merged = part if merged is None else merged.merge(part)
    if merged is None:
        raise EmptyDataError("no rank received any data")
    return merged


class _Sharded:
    """Runs an accumulator on one rank's batches under their global indices."""

    def __init__(self, inner: Accumulator, indices: list[int]):
        self.inner, self.indices = inner, indices

    def update(self, batch_index: int, tokens: Tensor) -> None:
        self.inner.update(self.indices[batch_index], tokens)

    def state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.inner.load_state_dict(state)


def restored(checkpoint: Checkpointing | None, key: str, n_batches: int, ctx: DistContext) -> bool:
    """Whether this process's share of a pass over `n_batches` batches is saved whole under
    `key` (the pass will be read back, not computed): for honest ETAs and resume lines."""
    mine = len(ctx.shard(n_batches))
    sharded = f"{key}.rank{ctx.rank}of{ctx.world_size}" if ctx.active else key
    return mine > 0 and saved_batches(checkpoint, sharded) >= mine


def stream_sharded(
    accumulator: Accumulator,
    batches: list[Tensor],
    description: str,
    ctx: DistContext,
    checkpoint: Checkpointing | None = None,
    key: str = "state",
    progress: bool = True,
    fingerprint: Callable[[], dict[str, Any]] | None = None,
) -> list[dict[str, Tensor]]:
    """Fold this rank's batches into `accumulator` (checkpointed per rank, resumable; a state
    of another `fingerprint` refused, see `streaming.stream`) and return every rank's final
    state in rank order."""
    indices = ctx.shard(len(batches))
    if ctx.active:
        key = f"{key}.rank{ctx.rank}of{ctx.world_size}"
    if indices:
        stream(
            _Sharded(accumulator, indices),
            [batches[i] for i in indices],
            description,
            checkpoint,
            key=key,
            progress=progress and ctx.is_main,
            fingerprint=fingerprint,
        )
    state = accumulator.state_dict() if indices else {}
    return all_gather_states(state, ctx)


if __name__ == "__main__":  # `python -m` of this module used to exit 0 having done nothing
    raise SystemExit(
        "tl_degeneracy.engine.distributed is a library, not a command: run the job under "
        "torchrun as `torchrun --nproc_per_node N $(which tl-degeneracy) fit ...` "
        "(docs/distributed.md)"
    )

"""Statistics over several processes with `torch.distributed` (gloo on CPU, NCCL on CUDA).

Each rank streams its shard of the batches (batch `i` goes to rank `i mod world_size`) under
the batch's *global* index, so stochastic sources, which are seeded per batch, are the same as
in a single process. The ranks' accumulator states are then all-gathered and merged in rank
order, so every rank holds the same, deterministic result: Gram statistics merge with Chan's
formula, Jacobian Grams and edges are sums. Merged results equal a one-process run to float64
rounding.

Launch with `torchrun` (one machine or several, see docs/distributed.md):

    torchrun --nproc_per_node 2 -m tl_degeneracy.engine.distributed statistics --model smollm2 ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tl_degeneracy.engine.compat import API, model_cfg
from tl_degeneracy.engine.jacobians import JacobianConfig, JacobianGram, _JacobianAccumulator
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import SiteLike, validate_sites
from tl_degeneracy.engine.statistics import GramStatistics, _GramAccumulator
from tl_degeneracy.engine.streaming import (
    Accumulator,
    Checkpointing,
    EmptyDataError,
    iter_batches,
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


def merge_gram_states(states: Sequence[dict[str, Tensor]], stats: GramStatistics) -> GramStatistics:
    """Chan-merge per-rank Gram states into `stats`' sites, in rank order; ranks without
    data are skipped."""
    merged: GramStatistics | None = None
    for state in states:
        if not state:
            continue
        part = GramStatistics(list(stats.sites))
        part.load_state_dict(state)
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


def stream_sharded(
    accumulator: Accumulator,
    batches: list[Tensor],
    description: str,
    ctx: DistContext,
    checkpoint: Checkpointing | None = None,
    key: str = "state",
    progress: bool = True,
) -> list[dict[str, Tensor]]:
    """Fold this rank's batches into `accumulator` (checkpointed per rank, resumable) and
    return every rank's final state in rank order."""
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
        )
    state = accumulator.state_dict() if indices else {}
    return all_gather_states(state, ctx)


def distributed_statistics(
    model: nn.Module,
    sites: Sequence[SiteLike],
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    batch_size: int = 256,
    ctx: DistContext | None = None,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
) -> GramStatistics:
    """`collect_statistics` over all ranks: every rank returns the merged statistics."""
    ctx = ctx or DistContext()
    resolved = validate_sites(model, sites)
    acc = _GramAccumulator(model, resolved)
    states = stream_sharded(
        acc,
        iter_batches(tokens, batch_size),
        "Gram statistics",
        ctx,
        checkpoint,
        "gram",
        progress,
    )
    return merge_gram_states(states, GramStatistics(resolved))


def distributed_jacobian_gram(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"] | Iterable[Tensor],
    section: Section,
    out_basis: Float[Tensor, "d_out k_out"] | None = None,
    config: JacobianConfig | None = None,
    batch_size: int = 256,
    ctx: DistContext | None = None,
    checkpoint: Checkpointing | None = None,
    progress: bool = True,
) -> JacobianGram:
    """`jacobian_gram` over all ranks (every state of it is a sum, so the merge adds)."""
    ctx = ctx or DistContext()
    config = config or JacobianConfig()
    acc = _JacobianAccumulator(model, section, out_basis, config)
    states = stream_sharded(
        acc,
        iter_batches(tokens, batch_size),
        f"M' {section.name} ({acc.method})",
        ctx,
        checkpoint,
        f"jacobian.{section.name}",
        progress,
    )
    merged = _JacobianAccumulator(model, section, out_basis, config)
    merged.load_state_dict(sum_states([s for s in states if s]))
    return merged.finalize()


# ---------------------------------------------------------------------------------------------
# Models for worker processes, and the `python -m tl_degeneracy.engine.distributed` entry point
# ---------------------------------------------------------------------------------------------


def save_model_file(model: nn.Module, config: dict, folder: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` (HookedTransformer names) so that worker
    processes can rebuild the same model with `load_model_file`."""
    from tl_degeneracy.engine.compat import hooked_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in hooked_state_dict(model).items()}
    save_file(sd, str(folder / "model.safetensors"))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps({**config, "dtype": dtype}))
    return folder


def load_model_file(folder: str | Path, api: API | Literal["auto"] = "auto") -> nn.Module:
    """A model written by `save_model_file` (or `smollm2` for the embedded default)."""
    if str(folder) == "smollm2":
        from tl_degeneracy.models import load_smollm2

        return load_smollm2(api=api)
    from tl_degeneracy.engine.compat import build_model

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    dtype = getattr(torch, config.pop("dtype", "float32"))
    sd = load_file(str(folder / "model.safetensors"))
    return build_model(config, sd, api=api, dtype=dtype)


def save_statistics(stats: GramStatistics, path: str | Path) -> Path:
    """Save merged statistics as safetensors (state dict) plus the site list in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"sites": json.dumps([s.to_json() for s in stats.sites])}
    save_file({k: v.contiguous() for k, v in stats.state_dict().items()}, str(path), meta)
    return path


def load_statistics(path: str | Path) -> GramStatistics:
    """Inverse of `save_statistics`."""
    from safetensors import safe_open

    from tl_degeneracy.engine.sites import Site

    with safe_open(str(path), "pt") as f:
        sites = [Site.from_json(s) for s in json.loads(f.metadata()["sites"])]
    stats = GramStatistics(sites)
    stats.load_state_dict(load_file(str(path)))
    return stats


def _tokens_for(args: argparse.Namespace, model: nn.Module) -> Tensor:
    if args.tokens_file:
        return load_file(args.tokens_file)["tokens"]
    from tl_degeneracy.models import load_corpus

    return load_corpus(model.tokenizer, args.seq_len, "train", max_tokens=args.tokens)


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    """Entry point for `torchrun ... -m tl_degeneracy.engine.distributed statistics ...`."""
    p = argparse.ArgumentParser(prog="python -m tl_degeneracy.engine.distributed")
    p.add_argument("task", choices=["statistics", "lm-fit"], help="what to compute")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a save_model_file folder")
    p.add_argument("--api", default="auto", choices=["auto", "hooked", "bridge"])
    p.add_argument("--sites", nargs="*", default=None, help="hook names (default: LM sites)")
    p.add_argument("--tokens", type=int, default=4096, help="corpus tokens (smollm2)")
    p.add_argument("--tokens-file", default=None, help="safetensors with a 'tokens' tensor")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    p.add_argument("--sources", type=int, default=4, help="Rademacher sources for M' (lm-fit)")
    p.add_argument("--out", required=True, help="output file (statistics) or folder (lm-fit)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = DistContext.from_env()
    start = time.perf_counter()
    try:
        if args.task == "lm-fit":
            from tl_degeneracy.experiments.lm_study import LMFitConfig, run_lm_fit

            config = LMFitConfig(
                n_tokens=args.tokens, n_sources=args.sources, batch_rows=args.batch_size
            )
            run_lm_fit(config, args.out, ctx=ctx, log=log if ctx.is_main else lambda s: None)
            return 0
        model = load_model_file(args.model, args.api)
        tokens = _tokens_for(args, model)
        if args.sites:
            sites = args.sites
        else:
            from tl_degeneracy.experiments.lm_study import lm_sites

            sites = lm_sites(model_cfg(model).n_layers)
        ckpt = Checkpointing(args.checkpoint_dir, 10) if args.checkpoint_dir else None
        stats = distributed_statistics(model, sites, tokens, args.batch_size, ctx, ckpt)
        if ctx.is_main:
            save_statistics(stats, args.out)
            log(
                f"rank 0 of {ctx.world_size}: statistics of {stats.count} tokens at "
                f"{len(stats.sites)} sites -> {args.out} ({time.perf_counter() - start:.1f} s)"
            )
        ctx.barrier()
    finally:
        if ctx.active:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The `fit` command's job: any model (a preset or a folder), its data or the user's own text or
tokens, any sites, any device and dtype, through the generic study (`experiments.study`)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.compat import as_dtype, has_hooked_weights, usable_device
from tl_degeneracy.engine.distributed import DistContext
from tl_degeneracy.engine.edges import EdgeConfig
from tl_degeneracy.engine.jacobians import JacobianConfig
from tl_degeneracy.engine.progress import Log
from tl_degeneracy.engine.sites import Positions, Site, SiteError, residual_sites
from tl_degeneracy.engine.streaming import finish_checkpoint_folder
from tl_degeneracy.experiments.study import Study, StudyConfig, finish_timings, run_study
from tl_degeneracy.experiments.study_output import write_language_model_study, write_study
from tl_degeneracy.models.presets import Preset, load_preset


def parse_positions(text: str) -> Positions:
    """Positions as the command line writes them: `all`, `last`, a slice like `1:`, or
    comma-separated indices like `0,3,-1` (a `ValueError` for anything else)."""
    if text in ("all", "last") or ":" in text:
        return Site("x", text).positions  # a slice Site refuses raises here
    return tuple(int(p) for p in text.split(","))


def parse_site(text: str) -> Site:
    """`hook` or `hook@positions` (`parse_positions`); other positions are a `SiteError`
    naming the site and the accepted forms."""
    hook, _, pos = text.partition("@")
    if not pos:
        return Site(hook)
    try:
        return Site(hook, parse_positions(pos))
    except ValueError:  # int() of a non-number, or a slice Site refuses
        raise SiteError(
            f"site {text!r}: positions {pos!r} are not understood; after '@' give all, last, "
            f"a slice like 1: or 1:8, or comma-separated integers like 0,3,-1 "
            f"(e.g. {hook}@1:)"
        ) from None


@dataclass(frozen=True)
class FitJob:
    """What to fit: a model spec, sites, data and the study's settings."""

    model: str = "smollm2"
    out: str = "out/fit"
    sites: tuple[str, ...] | None = None
    mlp_sites: tuple[int, ...] = ()
    attn_sites: tuple[int, ...] = ()
    text: tuple[str, ...] | None = None
    tokens: str | None = None
    n_tokens: int = 2048
    seq_len: int = 128
    keep_bos: bool = False
    device: str | None = None
    dtype: str | None = None
    api: str = "auto"
    tokenizer: str | None = None
    """A folder with the tokenizer of a checkpoint saved without one."""
    study: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset kind's `StudyConfig` defaults."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FitJob:
        overrides: dict[str, Any] = {"kinds": tuple(args.kinds), "store": args.store}
        for name in ("batch_rows", "edge_tokens", "edge_outputs", "ablation_tokens"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        if args.sources is not None:
            overrides["sources"] = args.sources
        if args.stats_device:
            overrides["stats_device"] = args.stats_device
        overrides["progress"] = not args.quiet
        return cls(
            model=args.model,
            out=args.out,
            sites=tuple(args.sites) if args.sites else None,
            mlp_sites=tuple(args.mlp_sites),
            attn_sites=tuple(args.attn_sites),
            text=tuple(args.text) if args.text else None,
            tokens=args.tokens,
            n_tokens=args.n_tokens,
            seq_len=args.seq_len,
            keep_bos=args.keep_bos,
            device=args.device,
            dtype=args.dtype,
            api=args.api,
            tokenizer=args.tokenizer,
            study=overrides,
        )

    def config(self, preset: Preset) -> StudyConfig:
        """Defaults by kind of model (a language model: stochastic `M'`, edges into the top 16
        outputs; a task model such as modular addition: exact closed forms, raw logits, whole
        data per batch), then the job's overrides."""
        if preset.language_model:
            base = StudyConfig()
        else:
            base = StudyConfig(
                final_basis="raw",
                truncation=Truncation(),
                jacobian=JacobianConfig(),
                batch_rows=4096,
                edge_tokens=1 << 30,
                edge_outputs=None,
                edges=EdgeConfig(),
                ablation_tokens=1 << 30,
                ablation_ks=None,
            )
        overrides = dict(self.study)
        sources = overrides.pop("sources", None)
        if sources is not None:
            jac = JacobianConfig() if sources == 0 else JacobianConfig("stochastic", sources)
            overrides["jacobian"] = jac
        return replace(base, **overrides)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else as_dtype(name)


def job_sites(job: FitJob, preset: Preset) -> list[Site]:
    for flag, blocks, example in (
        ("--mlp-sites", job.mlp_sites, "blocks.3.mlp.hook_post@1:"),
        ("--attn-sites", job.attn_sites, "blocks.3.attn.hook_z@1:"),
    ):
        if blocks and (job.sites is not None or not preset.language_model):
            given = (
                "--sites lists the sites"
                if job.sites is not None
                else f"{preset.name} has fixed sites"
            )
            raise SiteError(
                f"{flag} adds sites to a language model's default sites, but {given}; "
                f"list them with --sites instead (e.g. {example})"
            )
    if job.sites is not None:  # without @positions, a text's BOS is left out as by default
        default = "1:" if preset.language_model and not job.keep_bos else "all"
        return [
            parse_site(s) if "@" in s else parse_site(s).with_positions(default) for s in job.sites
        ]
    if preset.language_model:
        positions = "all" if job.keep_bos else "1:"
        return residual_sites(
            preset.model, positions=positions, mlp=job.mlp_sites, attn=job.attn_sites
        )
    return preset.sites(not job.keep_bos)


def job_data(job: FitJob, preset: Preset) -> tuple[Tensor, Tensor | None]:
    """Training rows and held-out rows: the user's tokens or text (its last tenth held out),
    else the preset's data."""
    if job.tokens is None and (job.text is not None or preset.language_model):
        preset.check_seq_len(job.seq_len)
    if job.tokens is not None or job.text is not None:
        rows = preset.rows_from(job.text, job.tokens, job.seq_len)
        n_ctx = preset.context()
        if job.tokens is not None and n_ctx is not None and rows.shape[-1] > n_ctx:
            raise ValueError(
                f"--tokens {job.tokens}: rows of {rows.shape[-1]} tokens, longer than the "
                f"model's context (n_ctx = {n_ctx}): write rows of at most {n_ctx} tokens "
                f"(e.g. tokens[:, :{n_ctx}])"
            )
        if rows.shape[0] < 2:
            raise ValueError(_too_little_data(job, rows))
        n_held = max(1, rows.shape[0] // 10)
        train, held = rows[:-n_held], rows[-n_held:]
        limit = max(1, job.n_tokens // rows.shape[1])
        return train[:limit], held
    n = job.n_tokens if preset.language_model else None
    return preset.data("train", n, job.seq_len), preset.data("heldout", None, job.seq_len)


def _too_little_data(job: FitJob, rows: Tensor) -> str:
    """What is wrong when the user's data makes fewer than two rows, and what to do."""
    if job.tokens is not None:
        return (
            f"--tokens {job.tokens} holds {rows.shape[0]} row(s): need at least two (one to "
            "fit on, a tenth held out for ablation)"
        )
    files = ", ".join(job.text or ())
    return (
        f"--text {files} gives {rows.shape[0]} row(s) of {job.seq_len} tokens: need at least "
        "two (one to fit on, a tenth held out for ablation); give more text or a smaller "
        "--seq-len"
    )


def recorded_job(job: FitJob) -> dict[str, Any]:
    """The job as the study records it, paths made absolute (`prompt-graph` loads the model
    again from this record, from wherever it runs)."""

    def absolute(value: str | None) -> str | None:
        if value is None or value in ("smollm2", "modadd") or not Path(value).expanduser().exists():
            return value
        return str(Path(value).expanduser().resolve())

    record = {k: v for k, v in vars(job).items() if k != "study"}
    record["model"], record["tokenizer"] = absolute(job.model), absolute(job.tokenizer)
    record["tokens"] = absolute(job.tokens)
    record["text"] = None if job.text is None else [absolute(t) for t in job.text]
    return record


def run_fit_job(job: FitJob, ctx: DistContext | None = None, log: Log = print) -> Study:
    """Load, fit, write to `job.out` (rank 0). Resumes from `job.out`."""
    ctx = ctx or DistContext()
    start = time.perf_counter()
    device = job.device
    if job.study.get("stats_device") is not None:  # before anything is loaded (as the device)
        usable_device(job.study["stats_device"])
    if device is None and ctx.active and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    preset = load_preset(
        job.model,
        job.api,  # type: ignore[arg-type]
        _dtype(job.dtype),
        device,
        job.tokenizer,
    )
    sites = job_sites(job, preset)
    tokens, heldout = job_data(job, preset)
    config = job.config(preset)
    hooks_only = "" if has_hooked_weights(preset.model) else " (through its hooks only)"
    log(
        f"{preset.name}: {type(preset.model).__name__}{hooks_only} on {device or 'cpu'}, "
        f"{len(sites)} sites, {tokens.numel()} training tokens, rank {ctx.rank}/{ctx.world_size}"
    )
    if preset.language_model and tokens.numel() + tokens.shape[1] <= job.n_tokens:
        held = "; a tenth of its rows is held out for ablation" if job.text or job.tokens else ""
        log(
            f"(the data gives {tokens.numel()} training tokens, fewer than --n-tokens "
            f"{job.n_tokens}{held})"
        )
    study = run_study(
        preset.model,
        sites,
        tokens,
        config,
        job.out,
        heldout,
        preset.metric,
        preset.higher_is_better,
        ctx,
        log,
    )
    finish_timings(study, start)
    study.metadata["job"] = recorded_job(job)
    if ctx.is_main:
        if preset.language_model:
            write_language_model_study(study, job.out, preset.model, heldout, log)
        else:
            write_study(study, job.out, log=log)
        finish_checkpoint_folder(Path(job.out) / "checkpoints")
    ctx.barrier()
    return study

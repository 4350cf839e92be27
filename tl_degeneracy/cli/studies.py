"""The paper studies: `replicate-modadd`, `replicate-mlp` and `degeneracy`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tl_degeneracy.cli.checks import SEQ_LEN, THREADS, count
from tl_degeneracy.cli.fit import demo_checkpoint
from tl_degeneracy.cli.registry import command


def _replicate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoints", nargs="*", help="checkpoint folders; default: the package's own model"
    )
    p.add_argument("--out", default="out/replication", help="output folder")
    p.add_argument("--max-k", type=int, default=64, help="node ablation for every k up to this")
    p.add_argument(
        "--tolerance", type=float, default=0.001, help="edge-ablation tolerance in test accuracy"
    )
    p.add_argument("--api", default="auto", choices=["auto", "hooked", "bridge"])
    p.add_argument(
        "--jobs",
        type=count(1),
        default=None,
        help="checkpoints in parallel, one thread each (default: the number of CPUs)",
    )


@command("replicate-modadd", "replicate the LIB paper's modular-addition results per checkpoint")(
    _replicate_args
)
def run_replicate(args: argparse.Namespace) -> int:
    import os

    from tl_degeneracy.experiments.replicate_modadd import replicate_checkpoints

    checkpoints = [Path(c) for c in args.checkpoints] or [demo_checkpoint()]
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    start = time.perf_counter()
    replicate_checkpoints(
        checkpoints, args.out, args.max_k, args.tolerance, api=args.api, jobs=jobs
    )
    print(f"{len(checkpoints)} checkpoint(s) in {time.perf_counter() - start:.1f} s")
    return 0


def _replicate_mlp_args(p: argparse.ArgumentParser) -> None:
    from tl_degeneracy.experiments.replicate_mlp import EDGE_TOLERANCE, NODE_TOLERANCE

    p.add_argument(
        "checkpoints",
        nargs="*",
        help="digits checkpoint folders; default: the package's seeds 0-4",
    )
    p.add_argument("--out", default="out/mlp", help="output folder (default: %(default)s)")
    p.add_argument(
        "--node-tolerance",
        type=float,
        default=NODE_TOLERANCE,
        help="features needed: held-out accuracy within this of the model's (%(default)s)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=EDGE_TOLERANCE,
        help="edges required: held-out accuracy within this (%(default)s)",
    )
    p.add_argument(
        "--jobs",
        type=count(1),
        default=None,
        help="checkpoints in parallel, one thread each (default: the number of CPUs)",
    )


@command(
    "replicate-mlp",
    "LIB vs PCA on a ReLU MLP classifying the 8x8 digits, over five training seeds",
)(_replicate_mlp_args)
def run_replicate_mlp(args: argparse.Namespace) -> int:
    import os

    from tl_degeneracy.experiments.replicate_mlp import replicate_checkpoints, summary_markdown

    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    summary = replicate_checkpoints(
        args.checkpoints or None, args.out, args.node_tolerance, args.tolerance, jobs=jobs
    )
    print(summary_markdown(summary))
    print(f"wrote {args.out} (summary.md, summary.json, one folder per checkpoint)")
    return 0


def _degeneracy_args(p: argparse.ArgumentParser) -> None:
    from tl_degeneracy.experiments.degeneracy_job import DegeneracyJobConfig

    d = DegeneracyJobConfig()
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a preset (modadd, smollm2), a modular-addition checkpoint folder or a Hugging "
        "Face checkpoint folder (loaded offline); default: the package's own modular-addition "
        "model",
    )
    p.add_argument("--out", default="out/degeneracy", help="output folder (default: %(default)s)")
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--text", nargs="+", default=None, help="UTF-8 text files (default: the model's data)"
    )
    data.add_argument(
        "--tokens", default=None, help="a safetensors file with 'tokens' (or 'input_ids')"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a folder with tokenizer files, for a checkpoint saved without them (e.g. its "
        "base model's folder)",
    )
    p.add_argument("--api", default="auto", choices=["auto", "hooked", "bridge"])
    p.add_argument(
        "--sections",
        nargs="+",
        default=None,
        help="only these sections, e.g. blocks.15.mlp (the total covers them together)",
    )
    p.add_argument(
        "--llc",
        default=d.llc,
        choices=["all", "total", "none"],
        help="SGLD per section and total, total only, or none (default: %(default)s)",
    )
    p.add_argument(
        "--eps", type=float, default=None, help="cutoff (1e-10; 1e-6 for a language model)"
    )
    p.add_argument("--cutoff", default=d.cutoff, choices=["relative", "absolute"])
    p.add_argument(
        "--n-data",
        type=count(1),
        default=None,
        help="data points (default: all of a task's inputs, 64 rows of a language model)",
    )
    p.add_argument(
        "--seq-len",
        type=SEQ_LEN,
        default=d.seq_len,
        help="tokens per row of a language model (default: %(default)s)",
    )
    p.add_argument(
        "--probes",
        type=count(1),
        default=d.n_probes,
        help="probes per sequence for K (default: %(default)s)",
    )
    p.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="SGLD ε, run exactly (default: chosen per estimate by pilot chains)",
    )
    p.add_argument("--gamma", type=float, default=d.gamma, help="SGLD localisation γ")
    p.add_argument("--nbeta", type=float, default=None, help="nβ (default: n / log n)")
    p.add_argument(
        "--chains", type=count(1), default=d.chains, help="SGLD chains (default: %(default)s)"
    )
    p.add_argument(
        "--steps",
        type=count(1),
        default=d.steps,
        help="steps per chain, burn-in included (default: %(default)s)",
    )
    p.add_argument(
        "--burnin",
        type=count(0),
        default=d.burnin,
        help="steps dropped from the start of each chain; below --steps (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=count(1),
        default=d.batch_size,
        help="SGLD minibatch (default: %(default)s)",
    )
    p.add_argument(
        "--max-total-steps",
        type=count(1),
        default=d.max_total_steps,
        help="calibration budget per estimate: SGLD steps of pilots, chains and checks, "
        "over every γ tried (default: %(default)s)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="calibration budget per estimate in seconds (default: none)",
    )
    p.add_argument(
        "--max-steps",
        type=count(1),
        default=d.max_steps,
        help="most steps per chain when R-hat asks for longer chains (default: %(default)s)",
    )
    p.add_argument(
        "--lower-gamma",
        type=count(0, " (0: never)"),
        default=d.lower_gamma,
        help="times γ may be divided by 10 when an estimate depends on it (default: "
        "%(default)s; 0: never)",
    )
    p.add_argument(
        "--no-step-check",
        dest="step_check",
        action="store_false",
        help="skip the check of each estimate at the next smaller step size over its whole "
        "length (faster, less safe)",
    )
    p.add_argument(
        "--grid-step-sizes",
        type=float,
        nargs="+",
        default=[],
        help="re-estimate the total's λ̂ at these step sizes (sensitivity grid)",
    )
    p.add_argument(
        "--grid-nbetas",
        type=float,
        nargs="+",
        default=None,
        help="... and at these nβ (default: n / log n only)",
    )
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("degeneracy", "the degeneracy report: three sources, SGLD N_eff, additivity of modules")(
    _degeneracy_args
)
def run_degeneracy(args: argparse.Namespace) -> int:
    import torch

    from tl_degeneracy.experiments.degeneracy_job import DegeneracyJobConfig, run_degeneracy_job

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = DegeneracyJobConfig(
        model=args.model,
        api=args.api,
        text=tuple(args.text) if args.text else None,
        tokens=args.tokens,
        tokenizer=args.tokenizer,
        sections=tuple(args.sections) if args.sections else None,
        llc=args.llc,
        eps=args.eps,
        cutoff=args.cutoff,
        n_data=args.n_data,
        seq_len=args.seq_len,
        n_probes=args.probes,
        step_size=args.step_size,
        gamma=args.gamma,
        nbeta=args.nbeta,
        chains=args.chains,
        steps=args.steps,
        burnin=args.burnin,
        batch_size=args.batch_size,
        max_total_steps=args.max_total_steps,
        max_seconds=args.max_seconds,
        max_steps=args.max_steps,
        lower_gamma=args.lower_gamma,
        step_check=args.step_check,
        sensitivity_step_sizes=tuple(args.grid_step_sizes),
        sensitivity_nbetas=tuple(args.grid_nbetas) if args.grid_nbetas else (None,),
        progress=not args.quiet,
    )
    report = run_degeneracy_job(config, args.out)
    print(report.to_markdown())
    print(f"wrote {args.out} (report.json, report.safetensors, report.html, report.md, job.json)")
    return 0

"""`tl-degeneracy`: the command-line entry point.

Subcommands:
  demo          the main job on the embedded default (see README)
  fit-modadd    fit LIB and PCA on a modular-addition checkpoint, ablate, write the results
  fit-lm        LIB and PCA at every residual cut of SmolLM2-135M: edges, ablation, report
  degeneracy    the degeneracy report (three sources, SGLD N_eff) of a checkpoint or SmolLM2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str):
    """Register a subcommand: `setup(parser)` adds its arguments, the function runs it."""

    def wrap(setup: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable):
            COMMANDS[name] = (help_text, setup, run)
            return run

        return register

    return wrap


def _fit_modadd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="checkpoint folder (model.safetensors + config.json); default: the "
        "package's own p=113 model",
    )
    p.add_argument("--out", default="out/modadd", help="output folder (default: %(default)s)")
    p.add_argument(
        "--api",
        default="auto",
        choices=["auto", "hooked", "bridge"],
        help="TransformerLens API to hold the model in (default: %(default)s)",
    )
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["lib", "pca"],
        choices=["lib", "ib", "pca", "neuron"],
        help="bases to fit",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("fit-modadd", "fit LIB and PCA on a modular-addition model and write ablation curves")(
    _fit_modadd_args
)
def run_fit_modadd(args: argparse.Namespace) -> int:
    from tl_degeneracy.experiments.modadd_fit import fit_modadd, write_fit

    start = time.perf_counter()
    fit = fit_modadd(args.checkpoint, tuple(args.kinds), api=args.api, progress=not args.quiet)
    out = write_fit(fit, args.out)
    print(f"baseline test accuracy {fit.baseline_test_accuracy:.5f}")
    summary = json.loads((out / "summary.json").read_text())
    for site, entry in summary["sites"].items():
        parts = [
            f"{k}: kept {v['retained']}, min k (0.001) {v['min_k']['0.001']}"
            for k, v in entry.items()
        ]
        print(f"{site:32s} " + "; ".join(parts))
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _fit_lm_args(p: argparse.ArgumentParser) -> None:
    from tl_degeneracy.experiments.lm_study import LMFitConfig

    d = LMFitConfig()
    p.add_argument("--tokens", type=int, default=d.n_tokens, help="training tokens (%(default)s)")
    p.add_argument(
        "--sources", type=int, default=d.n_sources, help="Rademacher sources for M' (%(default)s)"
    )
    p.add_argument("--out", default="out/lm", help="output folder (default: %(default)s)")
    p.add_argument("--edge-tokens", type=int, default=d.edge_tokens, help="0 skips edges")
    p.add_argument(
        "--edge-outputs",
        type=int,
        default=d.edge_outputs,
        help="edges into the top N output features of each section",
    )
    p.add_argument(
        "--ablation-tokens",
        type=int,
        default=d.ablation_tokens,
        help="held-out tokens for node ablation; 0 skips it",
    )
    p.add_argument("--blocks", type=int, default=None, help="only the first N blocks")
    p.add_argument("--batch-rows", type=int, default=d.batch_rows, help="sequences per batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--api", default="auto", choices=["auto", "hooked", "bridge"])
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="re-run the model prefix per section instead of an activation store",
    )
    p.add_argument(
        "--skip-bos",
        action="store_true",
        help="leave position 0 (BOS) out of every site (slower: no activation store)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("fit-lm", "LIB and PCA at every residual cut of SmolLM2-135M, with edges and ablation")(
    _fit_lm_args
)
def run_fit_lm(args: argparse.Namespace) -> int:
    from tl_degeneracy.engine.distributed import DistContext
    from tl_degeneracy.experiments.lm_study import LMFitConfig, run_lm_fit, summary_lines

    config = LMFitConfig(
        n_tokens=args.tokens,
        n_sources=args.sources,
        edge_tokens=args.edge_tokens,
        edge_outputs=args.edge_outputs,
        ablation_tokens=args.ablation_tokens,
        n_blocks=args.blocks,
        batch_rows=args.batch_rows,
        api=args.api,
        cache_activations=not args.no_cache,
        skip_first_position=args.skip_bos,
        progress=not args.quiet,
    )
    ctx = DistContext.from_env()
    fit = run_lm_fit(config, args.out, ctx=ctx, threads=args.threads)
    if ctx.is_main:
        for line in summary_lines(fit):
            print(line)
        print(f"wrote {args.out} (report.html, lib/, pca/, summary.json)")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the SmolLM2 fit (default: %(default)s; on a shared 2-core "
        "machine two threads were 4x slower than one)",
    )
    p.add_argument("--skip-lm", action="store_true", help="only the modular-addition part")


@command(
    "demo",
    "the main job: LIB and PCA on SmolLM2-135M over the embedded Wikipedia corpus "
    "(OUT/lm, with report.html), then on the modular-addition model (OUT/modadd)",
)(_demo_args)
def run_demo(args: argparse.Namespace) -> int:
    from tl_degeneracy.models.corpus import wiki_path
    from tl_degeneracy.models.smollm2.loader import smollm2_gguf_path

    start = time.perf_counter()
    out = Path(args.out)
    if not args.skip_lm:
        try:
            smollm2_gguf_path(), wiki_path()
        except FileNotFoundError as missing:
            print(f"skipping the SmolLM2 part of the demo: {missing}")
        else:
            lm_args = ["fit-lm", "--out", str(out / "lm"), "--threads", str(args.threads)]
            run_fit_lm(build_parser().parse_args(lm_args))
            print(f"SmolLM2 part done after {time.perf_counter() - start:.0f} s")
    modadd = argparse.Namespace(
        checkpoint=demo_checkpoint(),
        out=str(out / "modadd"),
        api="auto",
        kinds=["lib", "pca"],
        quiet=False,
    )
    run_fit_modadd(modadd)
    print(f"demo done in {time.perf_counter() - start:.0f} s: {out}")
    return 0


def demo_checkpoint() -> Path:
    """The package's own checkpoint; if this installation has none, a p = 53 model trained
    once with the project's training script and cached (about a minute on 2 cores)."""
    from tl_degeneracy.models.cache import cache_dir
    from tl_degeneracy.models.modadd.checkpoints import default_checkpoint_dir
    from tl_degeneracy.models.modadd.train import TrainConfig, save_result, train

    own = default_checkpoint_dir()
    if (own / "model.safetensors").is_file():
        return own
    cached = cache_dir() / "modadd-p53"
    if not (cached / "model.safetensors").is_file():
        print(f"no packaged checkpoint: training a p=53 model into {cached} first")
        result = train(TrainConfig(p=53, frac_train=0.5, max_epochs=3000, eval_every=100))
        save_result(result, cached)
    return cached


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
        type=int,
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


def _degeneracy_args(p: argparse.ArgumentParser) -> None:
    from tl_degeneracy.experiments.degeneracy_job import DegeneracyJobConfig

    d = DegeneracyJobConfig()
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="modular-addition checkpoint folder, or 'smollm2' (the embedded language model); "
        "default: the package's own modular-addition model",
    )
    p.add_argument("--out", default="out/degeneracy", help="output folder (default: %(default)s)")
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
    p.add_argument("--eps", type=float, default=None, help="cutoff (1e-10; 1e-6 for smollm2)")
    p.add_argument("--cutoff", default=d.cutoff, choices=["relative", "absolute"])
    p.add_argument("--n-data", type=int, default=None, help="data points (default: all / 64)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="LM tokens per row")
    p.add_argument("--probes", type=int, default=d.n_probes, help="probes per sequence for K")
    p.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="SGLD ε, run exactly (default: chosen per estimate by pilot chains)",
    )
    p.add_argument("--gamma", type=float, default=d.gamma, help="SGLD localisation γ")
    p.add_argument("--nbeta", type=float, default=None, help="nβ (default: n / log n)")
    p.add_argument("--chains", type=int, default=d.chains)
    p.add_argument("--steps", type=int, default=d.steps, help="steps per chain, burn-in included")
    p.add_argument("--burnin", type=int, default=d.burnin)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="SGLD minibatch")
    p.add_argument(
        "--max-total-steps",
        type=int,
        default=d.max_total_steps,
        help="calibration budget per estimate: SGLD steps of pilots and chains "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="calibration budget per estimate in seconds (default: none)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="most steps per chain when R-hat asks for longer chains (default: %(default)s)",
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
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("degeneracy", "the degeneracy report: three sources, SGLD N_eff, modularity")(
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
        sensitivity_step_sizes=tuple(args.grid_step_sizes),
        sensitivity_nbetas=tuple(args.grid_nbetas) if args.grid_nbetas else (None,),
        progress=not args.quiet,
    )
    report = run_degeneracy_job(config, args.out)
    print(report.to_markdown())
    print(f"wrote {args.out} (report.json, report.safetensors, report.html, report.md, job.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-degeneracy",
        description="Interaction bases (LIB/IB/PCA), interaction graphs and degeneracy "
        "measures for TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, setup, _) in COMMANDS.items():
        setup(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _, _, run = COMMANDS[args.command]
    return int(run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

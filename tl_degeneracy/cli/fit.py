"""The fitting commands: `fit` (any model), its presets `fit-lm` and `fit-modadd`, and `demo`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tl_degeneracy.cli.checks import (
    SEQ_LEN,
    THREADS,
    check_device,
    check_model_folder,
    count,
)
from tl_degeneracy.cli.registry import command

STORE_HELP = (
    "where section inputs are kept between passes: disk (in OUT, so an interrupted run resumes "
    "from them), memory, off (re-run the model prefix), or auto (default: disk on a CPU, "
    "memory on a GPU when it fits)"
)


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
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("fit-modadd", "fit LIB and PCA on a modular-addition model and write ablation curves")(
    _fit_modadd_args
)
def run_fit_modadd(args: argparse.Namespace) -> int:
    import torch

    from tl_degeneracy.experiments.modadd_fit import fit_modadd, write_fit

    check_model_folder(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
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


def _study_defaults() -> tuple[Any, Any]:
    """The `fit` job's study settings when no flag overrides them: for a language model, and
    for a task model such as modular addition (`FitJob.config`, which applies them)."""
    from tl_degeneracy.experiments.fit_job import FitJob

    job = FitJob()
    lm: Any = SimpleNamespace(language_model=True)
    task: Any = SimpleNamespace(language_model=False)
    return job.config(lm), job.config(task)


def _by_kind(lm: int | None, task: int | None) -> str:
    """`8 for a language model, 4096 for a task model`, with "all" for no limit."""

    def text(n: int | None) -> str:
        return "all" if n is None or n >= 1 << 30 else str(n)

    return f"{text(lm)} for a language model, {text(task)} for a task model such as modadd"


def _fit_args(p: argparse.ArgumentParser) -> None:
    from tl_degeneracy.engine.compat import FLOAT_DTYPES

    lm, task = _study_defaults()
    p.add_argument(
        "--model",
        default="smollm2",
        help="a preset (smollm2, modadd) or a folder: a Hugging Face checkpoint (config.json + "
        "*.safetensors + tokenizer files; loaded offline) or a modular-addition checkpoint",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a folder with tokenizer files, for a checkpoint saved without them (e.g. its "
        "base model's folder)",
    )
    p.add_argument("--out", default="out/fit", help="output folder (default: %(default)s)")
    p.add_argument(
        "--sites",
        nargs="+",
        default=None,
        help="hook names in forward order, the final site last, each optionally with positions "
        "after '@' (e.g. blocks.3.hook_resid_mid@1: or logits@last); default: the preset's "
        "(every residual cut of a language model)",
    )
    p.add_argument(
        "--mlp-sites",
        type=count(0),
        nargs="+",
        default=(),
        help="add the MLP site (hidden neurons + the bypassing stream) of these blocks",
    )
    p.add_argument(
        "--attn-sites",
        type=count(0),
        nargs="+",
        default=(),
        help="add the attention site (every head's output + hook_resid_pre) of these blocks",
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text", nargs="+", default=None, help="UTF-8 text files to fit on")
    data.add_argument(
        "--tokens",
        default=None,
        help="a safetensors file with a 'tokens' (or 'input_ids') tensor [rows, pos]",
    )
    p.add_argument("--n-tokens", type=count(1), default=2048, help="training tokens (%(default)s)")
    p.add_argument("--seq-len", type=SEQ_LEN, default=128, help="tokens per row (%(default)s)")
    p.add_argument("--kinds", nargs="+", default=["lib", "pca"], choices=["lib", "pca"])
    p.add_argument(
        "--sources",
        type=count(0, " (0 = exact)"),
        default=None,
        help=f"Rademacher sources for M' (default: {lm.jacobian.n_sources} for a language "
        "model, exact for a task model; 0 = exact)",
    )
    p.add_argument(
        "--batch-rows",
        type=count(1),
        default=None,
        help=f"rows per batch (default: {_by_kind(lm.batch_rows, task.batch_rows)})",
    )
    p.add_argument(
        "--edge-tokens",
        type=count(0, " (0 skips edges)"),
        default=None,
        help=f"tokens for the edges; 0 skips edges (default: "
        f"{_by_kind(lm.edge_tokens, task.edge_tokens)})",
    )
    p.add_argument(
        "--edge-outputs",
        type=count(1, " (leave it out for the default)"),
        default=None,
        help=f"edges into the top N output features of each section (default: "
        f"{_by_kind(lm.edge_outputs, task.edge_outputs)})",
    )
    p.add_argument(
        "--ablation-tokens",
        type=count(0, " (0 skips node ablation)"),
        default=None,
        help=f"held-out tokens for node ablation; 0 skips it (default: "
        f"{_by_kind(lm.ablation_tokens, task.ablation_tokens)})",
    )
    p.add_argument("--keep-bos", action="store_true", help="keep position 0 in every site")
    p.add_argument(
        "--store", default="auto", choices=["auto", "memory", "disk", "off"], help=STORE_HELP
    )
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(FLOAT_DTYPES),
        help="the model's dtype (default: float32 for a language model, float64 for "
        "modular addition)",
    )
    p.add_argument(
        "--stats-device", default=None, help="where float64 statistics live (default: the model's)"
    )
    p.add_argument("--api", default="auto", choices=["auto", "hooked", "bridge"])
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command(
    "fit",
    "the main job on any model: statistics, M', LIB and PCA bases, edges, node-ablation curves "
    "and the report (resumable; runs under torchrun)",
)(_fit_args)
def run_fit(args: argparse.Namespace) -> int:
    import torch

    from tl_degeneracy.engine.distributed import DistContext
    from tl_degeneracy.experiments.fit_job import FitJob, run_fit_job

    check_device("--device", args.device)
    check_device("--stats-device", args.stats_device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = DistContext.from_env()
    job = FitJob.from_args(args)
    study = run_fit_job(job, ctx=ctx, log=print if ctx.is_main else lambda s: None)
    if ctx.is_main:
        from tl_degeneracy.experiments.study_output import summary_lines

        for line in summary_lines(study):
            print(line)
        print(f"wrote {args.out} (report.html, bases/, graphs/, curves/, summary.json)")
    return 0


def _fit_lm_args(p: argparse.ArgumentParser) -> None:
    from tl_degeneracy.experiments.lm_study import LMFitConfig

    d = LMFitConfig()
    p.add_argument(
        "--tokens",
        type=count(1),
        default=d.n_tokens,
        metavar="N",
        help="the number of training tokens (%(default)s); a count here, where fit takes "
        "--n-tokens N (fit's --tokens is a token file)",
    )
    p.add_argument(
        "--sources",
        type=count(1),
        default=d.n_sources,
        help="Rademacher sources for M' (%(default)s)",
    )
    p.add_argument("--out", default="out/lm", help="output folder (default: %(default)s)")
    p.add_argument(
        "--edge-tokens",
        type=count(0, " (0 skips edges)"),
        default=d.edge_tokens,
        help="0 skips edges (default: %(default)s)",
    )
    p.add_argument(
        "--edge-outputs",
        type=count(1),
        default=d.edge_outputs,
        help="edges into the top N output features of each section",
    )
    p.add_argument(
        "--ablation-tokens",
        type=count(0, " (0 skips node ablation)"),
        default=d.ablation_tokens,
        help="held-out tokens for node ablation; 0 skips it (default: %(default)s)",
    )
    p.add_argument("--blocks", type=count(1), default=None, help="only the first N blocks")
    p.add_argument(
        "--batch-rows",
        type=count(1),
        default=d.batch_rows,
        help="sequences per batch (default: %(default)s)",
    )
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's)")
    p.add_argument("--api", default="auto", choices=["auto", "hooked", "bridge"])
    p.add_argument(
        "--store",
        default="auto",
        choices=["auto", "memory", "disk", "off"],
        help=STORE_HELP,
    )
    p.add_argument(
        "--keep-bos",
        action="store_true",
        help="keep position 0 (BOS, an attention sink) in every site (default: left out)",
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
        store=args.store,
        skip_bos=not args.keep_bos,
        progress=not args.quiet,
    )
    ctx = DistContext.from_env()
    fit = run_lm_fit(config, args.out, ctx=ctx, threads=args.threads)
    if ctx.is_main:
        for line in summary_lines(fit):
            print(line)
        print(f"wrote {args.out} (report.html, bases/, graphs/, curves/, summary.json)")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=THREADS,
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
    from tl_degeneracy.cli import build_parser
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
    # through the parser, as fit-lm above: every flag at its default (a Namespace written here
    # missed the one added later, --threads, and the demo failed)
    modadd = build_parser().parse_args(["fit-modadd", "--out", str(out / "modadd")])
    modadd.checkpoint = demo_checkpoint()
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

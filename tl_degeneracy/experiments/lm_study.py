"""The language-model study: LIB and PCA at every residual-stream cut of a transformer (the
demo: SmolLM2-135M on the embedded Wikipedia corpus), through the generic study
(`experiments.study`).

Sites are `hook_resid_pre` and `hook_resid_mid` of every block and the last block's
`hook_resid_post` (the final site, PCA basis), at every position but the first: the BOS token's
attention-sink activation would otherwise dominate every site's statistics (docs/
language_models.md). `M'` is stochastic (Rademacher sources over output positions and units),
edges stochastic over output positions into the top output features of each section, node
ablation on held-out text with the next-token loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.ablation import next_token_loss
from tl_degeneracy.engine.bases import Truncation
from tl_degeneracy.engine.distributed import DistContext
from tl_degeneracy.engine.edges import EdgeConfig
from tl_degeneracy.engine.fit import StoreMode
from tl_degeneracy.engine.jacobians import JacobianConfig
from tl_degeneracy.engine.progress import Log
from tl_degeneracy.engine.sites import Site, residual_sites
from tl_degeneracy.engine.streaming import finish_checkpoint_folder
from tl_degeneracy.experiments.study import Study, StudyConfig, finish_timings, run_study
from tl_degeneracy.experiments.study_output import (
    summary_lines,
    write_language_model_study,
    write_study,
)

SMOLLM2_ABLATION_SITES = (
    "blocks.5.hook_resid_mid",
    "blocks.15.hook_resid_mid",
    "blocks.25.hook_resid_mid",
)


@dataclass(frozen=True)
class LMFitConfig:
    """Settings of the language-model job. The defaults are the `fit-lm` demo (about five
    minutes on two free cores; see docs/language_models.md)."""

    n_tokens: int = 2048
    """Training tokens for the Gram statistics and `M'` (whole rows of `seq_len`)."""
    seq_len: int = 128
    n_sources: int = 4
    """Rademacher sources per data point for `M'`."""
    batch_rows: int = 8
    """Sequences per batch (the unit of streaming, checkpointing and sharding)."""
    n_blocks: int | None = None
    """Use only the first `n_blocks` blocks (None: all)."""
    kinds: tuple[Literal["lib", "pca"], ...] = ("lib", "pca")
    truncation: Truncation = field(default_factory=lambda: Truncation(1e-15, 1e-10))
    edge_tokens: int = 128
    """Tokens (first rows of the data) for the edges; 0 skips edges."""
    edge_outputs: int = 16
    """Edges into the top `edge_outputs` output features of each section."""
    edge_sources: int = 1
    ablation_tokens: int = 256
    """Held-out tokens for node-ablation curves; 0 skips them."""
    ablation_sites: tuple[str, ...] | None = None
    """Hook names to ablate at (None: three `hook_resid_mid` sites spread over the blocks)."""
    ablation_ks: tuple[int, ...] = (0, 4, 16, 64, 128, 256, 384, 512, 576)
    skip_bos: bool = True
    """Leave position 0 (the BOS token, an attention sink whose activation dominates every
    spectrum) out of every site; it keeps its value on the data."""
    seed: int = 0
    store: StoreMode = "auto"
    """Where section inputs are kept between passes ('off' re-runs the model's prefix)."""
    checkpoint_every: int = 4
    api: Literal["auto", "hooked", "bridge"] = "auto"
    progress: bool = True
    stats_device: str | None = None

    def study(self) -> StudyConfig:
        """The generic study's settings."""
        return StudyConfig(
            kinds=self.kinds,
            truncation=self.truncation,
            jacobian=JacobianConfig(method="stochastic", n_sources=self.n_sources, seed=self.seed),
            batch_rows=self.batch_rows,
            edge_tokens=self.edge_tokens,
            edge_outputs=self.edge_outputs,
            edges=EdgeConfig(method="stochastic", n_sources=self.edge_sources, seed=self.seed),
            ablation_tokens=self.ablation_tokens,
            ablation_sites=self.ablation_sites,
            ablation_ks=self.ablation_ks,
            store=self.store,
            checkpoint_every=self.checkpoint_every,
            progress=self.progress,
            stats_device=self.stats_device,
        )

    def sites(self, model: nn.Module) -> list[Site]:
        """Every residual cut of the first `n_blocks` blocks, BOS left out unless kept."""
        return residual_sites(model, self.n_blocks, "1:" if self.skip_bos else "all")


def fit_lm(
    model: nn.Module,
    tokens: Int[Tensor, "n pos"],
    config: LMFitConfig,
    work_dir: str | Path | None = None,
    heldout: Int[Tensor, "m pos"] | None = None,
    ctx: DistContext | None = None,
    log: Log = print,
) -> Study:
    """Fit `config.kinds` at every residual cut, stream edges on a slice and ablate on
    `heldout` (next-token loss). `work_dir` holds checkpoints (resume with the same folder)."""
    return run_study(
        model,
        config.sites(model),
        tokens,
        config.study(),
        work_dir,
        heldout,
        next_token_loss,
        higher_is_better=False,
        ctx=ctx,
        log=log,
    )


def run_lm_fit(
    config: LMFitConfig,
    out: str | Path,
    ctx: DistContext | None = None,
    log: Log = print,
    threads: int | None = None,
) -> Study:
    """Load SmolLM2 and the corpus, fit, write to `out` (rank 0). Resumes from `out`."""
    from tl_degeneracy.models import load_corpus, load_smollm2

    ctx = ctx or DistContext()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_smollm2(api=config.api)
    tokens = load_corpus(model.tokenizer, config.seq_len, "train", max_tokens=config.n_tokens)
    heldout = load_corpus(model.tokenizer, config.seq_len, "heldout")
    log(
        f"{model.cfg.model_name}: {type(model).__name__}, {torch.get_num_threads()} threads, "
        f"{tokens.numel()} tokens ({tokens.shape[0]} rows of {tokens.shape[1]}), "
        f"R = {config.n_sources}, rank {ctx.rank}/{ctx.world_size}; "
        f"loaded in {time.perf_counter() - start:.1f} s"
    )
    study = fit_lm(model, tokens, config, out, heldout, ctx, log)
    finish_timings(study, start)
    # how the model was loaded, as `fit` records it (`prompt-graph` loads it again from this)
    study.metadata["job"] = {"model": "smollm2", "api": config.api, "keep_bos": not config.skip_bos}
    if ctx.is_main:
        write_language_model_study(study, out, model, heldout, log)
        finish_checkpoint_folder(Path(out) / "checkpoints")
    ctx.barrier()
    return study


write_lm_fit = write_study
"""Save a study with its summary and report (the language-model job's artifacts)."""

__all__ = ["LMFitConfig", "fit_lm", "run_lm_fit", "summary_lines", "write_lm_fit"]

"""The degeneracy report as a job: load a model and its data, build the `DegeneracyReport`,
write it (JSON + safetensors + HTML + markdown) with its runtime. What `tl-degeneracy
degeneracy` runs.

Models: any the `fit` command takes (`models.presets.load_preset`): a modular-addition
checkpoint folder (the reference's `seed0`, the package's own, or any folder with
`model.safetensors` + `config.json`; data: its training inputs, KL at the last position),
`smollm2` (the embedded SmolLM2-135M on the Wikipedia corpus) or a Hugging Face checkpoint
folder (on the corpus tokenised with its tokenizer), language models with KL at every
position; or the user's own text or token file. Restrict a language model to one layer with
`sections`, e.g. `("blocks.15.mlp",)`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.degeneracy import (
    CalibrationConfig,
    DegeneracyReport,
    SGLDConfig,
    SourcesConfig,
    degeneracy_report,
)
from tl_degeneracy.engine.degeneracy.config import count, positive


@dataclass(frozen=True)
class DegeneracyJobConfig:
    """What to measure and how; `None` fields take the model kind's default."""

    model: str | None = None
    """A preset ("modadd", "smollm2"), a modular-addition or Hugging Face checkpoint folder, or
    None for the package's own modular-addition model."""
    api: Literal["auto", "hooked", "bridge"] = "auto"
    text: tuple[str, ...] | None = None
    """UTF-8 text files to measure a language model on (default: the Wikipedia corpus)."""
    tokens: str | None = None
    """A safetensors token file (`tokens` or `input_ids`) instead of the default data."""
    tokenizer: str | None = None
    """A folder with the tokenizer of a checkpoint saved without one."""
    sections: tuple[str, ...] | None = None
    llc: Literal["all", "total", "none"] = "all"
    eps: float | None = None
    """Cutoff; default 1e-10 (float64 modular addition) or 1e-6 (float32 language model)."""
    cutoff: Literal["relative", "absolute"] = "relative"
    n_data: int | None = None
    """Data points (sequences); default: all training inputs, or 64 rows of a language model."""
    seq_len: int = 32
    """Tokens per row of a language model (BOS first)."""
    n_probes: int = 16
    """Rademacher probes per sequence for the gradient source of wide outputs."""
    step_size: float | None = None
    """SGLD step size; None chooses it per estimate (`calibrated_llc`), a number runs exactly
    it (no calibration)."""
    gamma: float = 100.0
    nbeta: float | None = None
    """nβ; default n / log n."""
    chains: int = 4
    steps: int = 400
    burnin: int = 100
    batch_size: int = 512
    seed: int = 0
    max_total_steps: int = CalibrationConfig.max_total_steps
    """Calibration budget per estimate: SGLD steps over all pilots and chains."""
    max_seconds: float | None = None
    """Calibration budget per estimate in seconds (None: steps only for modular addition,
    1,800 s for a language model, where one SGLD step can take a second)."""
    max_steps: int = CalibrationConfig.max_steps
    """Most steps per chain when R-hat asks for longer chains."""
    lower_gamma: int = CalibrationConfig.lower_gamma
    """Times γ may be divided by 10 when λ̂ depends on it (`CalibrationConfig.lower_gamma`)."""
    step_check: bool = CalibrationConfig.discretisation_check
    """Check each estimate at the next smaller step size over its whole length."""
    sensitivity_step_sizes: tuple[float, ...] = ()
    """Re-estimate the total's λ̂ at these step sizes (empty: no sensitivity grid)."""
    sensitivity_nbetas: tuple[float | None, ...] = (None,)
    """... at each of these nβ (None: n / log n)."""
    progress: bool = True
    """tqdm bars for the SGLD runs."""

    def __post_init__(self) -> None:
        """Check every setting before a model is loaded: a bad one is a ValueError naming it
        (the command line shows it as one line and exits with status 2)."""
        for name, value, allowed in (
            ("api", self.api, ("auto", "hooked", "bridge")),
            ("llc", self.llc, ("all", "total", "none")),
            ("cutoff", self.cutoff, ("relative", "absolute")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("n_data", "seq_len", "n_probes", "chains", "steps", "batch_size"):
            if getattr(self, name) is not None:
                count(name, getattr(self, name), 1)
        if not 0 <= count("burnin", self.burnin, 0) < self.steps:
            raise ValueError(
                f"burnin ({self.burnin}) must be less than steps ({self.steps}): lower burnin "
                "or raise steps"
            )
        if self.nbeta is not None:
            positive("nbeta", self.nbeta, "e.g. 100, or None for n / log n")
        for nbeta in self.sensitivity_nbetas:
            if nbeta is not None:
                positive("every nβ of sensitivity_nbetas", nbeta)
        for eps in self.sensitivity_step_sizes:
            positive("every step size of sensitivity_step_sizes", eps)
        # the package's own checks of everything else (step size, chains, steps, cutoff, ...)
        self.sources_config(self.eps if self.eps is not None else 1e-10, "last", False)
        self.sgld_config(None)
        self.calibration_config(False)

    def sources_config(
        self, eps: float, positions: Literal["last", "all"], lm: bool
    ) -> SourcesConfig:
        return SourcesConfig(
            eps=eps,
            cutoff=self.cutoff,
            positions=positions,
            n_probes=self.n_probes,
            batch_size=8 if lm else 512,
            seed=self.seed,
        )

    def sgld_config(self, n: int | None) -> SGLDConfig:
        """The SGLD settings for n loss terms (`nbeta` / n is β)."""
        beta = None if self.nbeta is None or n is None else self.nbeta / n
        return SGLDConfig(
            step_size=self.step_size if self.step_size is not None else SGLDConfig.step_size,
            gamma=self.gamma,
            beta=beta,
            n_chains=self.chains,
            n_steps=self.steps,
            n_burnin=self.burnin,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def calibration_config(self, lm: bool) -> CalibrationConfig | None:
        """None when a step size is given (exactly those settings)."""
        if self.step_size is not None:
            return None
        return CalibrationConfig(
            max_total_steps=self.max_total_steps,
            max_seconds=self.max_seconds if self.max_seconds or not lm else 1800.0,
            max_steps=self.max_steps,
            lower_gamma=self.lower_gamma,
            discretisation_check=self.step_check,
        )


def load_target(
    config: DegeneracyJobConfig,
) -> tuple[nn.Module, Int[Tensor, "n pos"], Literal["last", "all"], bool]:
    """The model (float64 for modular addition, float32 for a language model), its data, the
    positions the behavioural loss reads, and whether it is a language model."""
    from tl_degeneracy.models.presets import load_preset

    preset = load_preset(config.model or "modadd", config.api, tokenizer=config.tokenizer)
    lm = preset.language_model
    n = (config.n_data or 64) if lm else config.n_data
    if lm:  # the rows are cut to --seq-len tokens
        preset.check_seq_len(config.seq_len)
    if config.text is not None or config.tokens is not None:
        rows = preset.rows_from(config.text, config.tokens, config.seq_len)
        if rows.shape[0] == 0:
            source = (
                f"--tokens {config.tokens}"
                if config.tokens
                else "--text " + ", ".join(config.text or ())
            )
            raise ValueError(
                f"{source} gives no row of {config.seq_len} tokens: give more text or a "
                "smaller --seq-len"
            )
    else:  # a language model's corpus in rows of 128, whose first `seq_len` tokens are read
        rows = preset.data("train", None if n is None else n * 128, 128)
    rows = rows[:n, : config.seq_len].clone() if lm else rows[:n]
    return preset.model, rows, "all" if lm else "last", lm


def run_degeneracy_job(config: DegeneracyJobConfig, out: str | Path) -> DegeneracyReport:
    """Build the report and write `report.json`, `report.safetensors`, `report.html`,
    `report.md` and `job.json` (settings, wall and CPU time) under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    model, tokens, positions, lm = load_target(config)
    eps = config.eps if config.eps is not None else (1e-6 if lm else 1e-10)
    sources = config.sources_config(eps, positions, lm)
    # nβ counts the loss terms: every position of a language model's rows, one per row else
    sgld = config.sgld_config(int(tokens.numel() if positions == "all" else tokens.shape[0]))
    calibration = config.calibration_config(lm)
    loaded = time.perf_counter() - wall
    report = degeneracy_report(
        model,
        tokens,
        sources,
        sgld,
        llc=config.llc,
        sections=config.sections,
        sgld_dtype=None if lm else torch.float32,
        sensitivity_step_sizes=config.sensitivity_step_sizes,
        sensitivity_nbetas=config.sensitivity_nbetas,
        progress=config.progress,
        calibration=calibration,
    )
    report.save(out / "report")
    report.save_html(out / "report.html")
    (out / "report.md").write_text(report.to_markdown())
    timing: dict[str, Any] = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "load_s": loaded,
        "sgld_s": {
            s.name: s.calibration.seconds if s.calibration else s.llc.seconds
            for s in [*report.sections, report.total]
            if s.llc
        },
        "cpu_count": os.cpu_count(),
        "sensitivity_s": [r.seconds for r in report.sensitivity],
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    job = {"config": asdict(config), "eps": eps, "timing": timing}
    (out / "job.json").write_text(json.dumps(job, indent=1))
    return report

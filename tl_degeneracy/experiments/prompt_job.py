"""The `prompt-graph` command's job: a fitted study's basis explains one prediction on the
user's own prompt (`engine.prompt_graph`), the graph's claim is checked by intervention, and,
given a corrupted prompt, its nodes are set beside attribution and activation patching.

The model is the study's own (its `fit` job records how it was loaded), so a folder written by
`tl-degeneracy fit` (or `fit-lm`, `demo`) is all it needs besides the prompt."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import jsonable
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import as_dtype, usable_device
from tl_degeneracy.engine.progress import Log
from tl_degeneracy.engine.prompt_graph import PromptGraph, Target, prompt_graph
from tl_degeneracy.engine.prompt_graph.interventions import InterventionResult, intervene

__all__ = ["PromptJob", "PromptJobResult", "load_study_model", "prompt_tokens", "run_prompt_job"]


PATCHED_NODES = 5
"""Nodes per site patched one at a time beside attribution patching (a forward each)."""
SHOWN_SITES = 16
"""The per-site comparison is printed up to this many sites (always in `patching.html`)."""


@dataclass(frozen=True)
class PromptJob:
    """One prompt to explain in a saved study's basis."""

    study: str
    """A folder written by `tl-degeneracy fit` (`study.json`, `bases/<kind>/`)."""
    prompt: str | None = None
    """Text, tokenised with the model's tokenizer (BOS first where the model has one)."""
    token_ids: tuple[int, ...] | None = None
    """Token ids instead of text (a model without a tokenizer, e.g. modular addition)."""
    answer: str | None = None
    """The token whose logit the graph explains (text; an id without a tokenizer). Default:
    the model's most likely next token."""
    vs: str | None = None
    """The token it is compared with (the target is `logit(answer) − logit(vs)`). Default:
    the most likely token other than the answer."""
    corrupted: str | None = None
    """A prompt of the same token length to compare with patching (text, or ids)."""
    kind: str = "lib"
    positions: str | None = None
    """Positions that carry nodes; default: those the study fitted (BOS left out)."""
    top: int = 10
    node_share: float = 0.8
    compare_sites: tuple[str, ...] | None = None
    """Sites compared with patching (default: every site of the graph)."""
    details_rows: int = 48
    """Corpus rows whose contexts the viewer shows for each kept feature (0: none)."""
    model: str | None = None
    """The model (a preset or a folder) when the study does not record it, or to override."""
    device: str | None = None
    out: str | None = None


@dataclass
class PromptJobResult:
    """What `run_prompt_job` computed and where it wrote it."""

    graph: PromptGraph
    check: InterventionResult
    """The graph's `top` supporting nodes set to their mean together."""
    estimate: float
    """The graph's first-order estimate of that change (−Σ of their attributions)."""
    comparison: Any
    """A `PatchingComparison` when a corrupted prompt was given, else None."""
    out: Path


def _recorded_job(study: Path) -> dict[str, Any]:
    """How the study's fit loaded its model (`study.json` → metadata → job)."""
    record = study / "study.json"
    if not record.is_file():
        raise FileNotFoundError(
            f"{study} is not a saved study (no study.json): write one with "
            f"tl-degeneracy fit --out {study} first"
        )
    return dict(json.loads(record.read_text()).get("metadata", {}).get("job") or {})


def load_study_model(job: PromptJob) -> tuple[nn.Module, BasisResult, dict[str, Any]]:
    """The study's model (as its fit loaded it, or `job.model`), its basis of `job.kind`
    (checked against the model) and the fit job's record."""
    from tl_degeneracy.models.presets import load_preset

    folder = Path(job.study)
    recorded = _recorded_job(folder)
    spec = job.model or recorded.get("model")
    if spec is None:
        raise ValueError(
            f"{folder} does not record its model (written by an older version, or by "
            "fit-modadd): name it with --model (a preset or a checkpoint folder)"
        )
    kinds = (
        sorted(p.name for p in (folder / "bases").iterdir()) if (folder / "bases").is_dir() else []
    )
    if job.kind not in kinds:
        raise ValueError(
            f"{folder} has no {job.kind} basis (it has: {', '.join(kinds) or 'none'}); "
            f"pass --kind {kinds[0] if kinds else 'lib'}"
        )
    dtype = recorded.get("dtype")
    device = job.device or recorded.get("device")
    if job.device is None and device is not None:
        try:
            usable_device(device)
        except ValueError as error:
            raise ValueError(
                f"{folder} was fitted on {device}: {error}; pass --device cpu (or another)"
            ) from None
    preset = load_preset(
        str(spec),
        api=recorded.get("api", "auto"),
        dtype=None if dtype is None else as_dtype(dtype),
        device=device,
        tokenizer=recorded.get("tokenizer") if job.model is None else None,
    )
    basis = BasisResult.load(folder / "bases" / job.kind, model=preset.model)
    return preset.model, basis, {**recorded, "language_model": preset.language_model}


def prompt_tokens(model: nn.Module, text: str | None, ids: tuple[int, ...] | None, flag: str):
    """One prompt as a `[1, pos]` row: text through the model's tokenizer (BOS first where it
    has one, as the corpus rows the fit read), or ids as given."""
    if ids is not None:
        return torch.tensor([list(ids)], dtype=torch.long)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"the model has no tokenizer to read {flag} with: give token ids instead")
    from tl_degeneracy.models.corpus import prompt_batches

    return prompt_batches([str(text)], tokenizer)[0]


def _token_id(model: nn.Module, token: str, flag: str) -> int:
    """A single token named by its text (or, without a tokenizer, its id)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        try:
            return int(token)
        except ValueError:
            raise ValueError(
                f"{flag} {token!r}: this model has no tokenizer, so name the token by its id "
                "(an integer)"
            ) from None
    ids = list(tokenizer.encode(token, add_special_tokens=False))
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"{flag} {token!r} is {len(ids)} tokens for this tokenizer ({pieces}): give a "
            "single token (a word mid-sentence usually starts with a space, e.g. ' Mary')"
        )
    return int(ids[0])


def _label(model: nn.Module, token: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return repr(tokenizer.decode([token])) if tokenizer is not None else str(token)


@torch.no_grad()
def choose_target(
    model: nn.Module, tokens: Int[Tensor, "1 pos"], answer: str | None, vs: str | None
) -> Target:
    """`logit(answer) − logit(vs)` at the last position; a token left out is the model's most
    likely one (other than the answer, for `vs`)."""
    from tl_degeneracy.engine.tokens import validate_tokens

    good = None if answer is None else _token_id(model, answer, "--answer")
    bad = None if vs is None else _token_id(model, vs, "--vs")
    if good is None or bad is None:
        logits = model(validate_tokens(model, tokens))[0, -1].double()
        if good is not None:
            logits[good] = -torch.inf
        order = logits.argsort(descending=True).tolist()
        if good is None:
            good = order[0] if order[0] != bad else order[1]
        if bad is None:
            bad = next(t for t in order if t != good)
    if good == bad:
        raise ValueError(
            f"--answer and --vs name the same token ({_label(model, good)}): the target "
            "logit(answer) − logit(vs) would be 0; name two different tokens"
        )
    labels = (_label(model, good), _label(model, bad))
    return Target.logit_difference(good, bad, labels=labels)


def _positions(job: PromptJob, basis: BasisResult) -> str | tuple[int, ...]:
    """The job's positions, else those of the basis's first site (the fit's own: `1:` when
    it left BOS out)."""
    if job.positions is None:
        return basis.sites[0].positions
    from tl_degeneracy.experiments.fit_job import parse_positions

    try:
        return parse_positions(job.positions)
    except ValueError:
        raise ValueError(
            f"--positions {job.positions!r} is not understood: give all, last, a slice like "
            "1: or 1:8, or comma-separated indices like 0,3,-1"
        ) from None


def run_prompt_job(job: PromptJob, log: Log = print) -> PromptJobResult:
    """Build, check and write the prompt graph of `job` (see the module docstring)."""
    from tl_degeneracy.engine.prompt_graph.compare import compare_with_patching

    if (job.prompt is None) == (job.token_ids is None):
        raise ValueError("give the prompt as text (--prompt) or as token ids (--token-ids)")
    model, basis, recorded = load_study_model(job)
    tokens = prompt_tokens(model, job.prompt, job.token_ids, "--prompt")
    target = choose_target(model, tokens, job.answer, job.vs)
    positions = _positions(job, basis)
    log(f"prompt: {tokens.shape[1]} tokens; target {target.name} at the last position")
    graph = prompt_graph(
        model, basis, tokens, target, positions=positions, node_share=job.node_share
    )
    if job.details_rows > 0 and recorded["language_model"]:
        graph = _with_details(model, graph, job.details_rows)
    log(graph.completeness_summary())
    top = graph.top_nodes(job.top, sign="supporting")
    check = intervene(model, basis, tokens, target, top, mode="mean")
    estimate = -sum(float(graph.candidates.attribution[graph.node_index(n)]) for n in top)
    log(
        f"the {len(top)} most influential supporting nodes set to their mean together: "
        f"{check.before:.4g} -> {check.after:.4g} (change {check.delta:+.4g}; the graph's "
        f"first-order estimate {estimate:+.4g})"
    )
    comparison = None
    if job.corrupted is not None:
        ids = _ids(job.corrupted) if job.token_ids is not None else None
        corrupted = prompt_tokens(model, job.corrupted, ids, "--corrupted")
        if corrupted.shape != tokens.shape:
            raise ValueError(
                f"--corrupted is {corrupted.shape[1]} tokens and the prompt {tokens.shape[1]}: "
                "patching compares positions one to one, so give prompts of equal token length"
            )
        sites = list(job.compare_sites) if job.compare_sites else None
        comparison = compare_with_patching(
            model, basis, tokens, corrupted, target, sites, positions, top=PATCHED_NODES
        )
        if len(comparison.sites) <= SHOWN_SITES:
            log(comparison.sites_table())
        log(
            f"{len(comparison.sites)} sites: the nodes' attribution patching adds up to "
            f"TransformerLens's within {comparison.max_site_discrepancy():.2g} (relative); "
            f"clean {comparison.clean_value:.4g}, corrupted {comparison.corrupted_value:.4g}"
        )
        log(
            f"per node (each site's {PATCHED_NODES} largest |attribution patching|, each patched "
            f"alone): Spearman rho with patching {comparison.correlation():.3f} over "
            f"{len(comparison.nodes)} nodes"
        )
    out = _write(job, graph, check, estimate, comparison, top)
    log(f"wrote {out} (graph.html, graph/, summary.json{', patching.html' if comparison else ''})")
    return PromptJobResult(graph, check, estimate, comparison, out)


def _ids(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.replace(",", " ").split())


def _with_details(model: nn.Module, graph: PromptGraph, rows: int) -> PromptGraph:
    """Top contexts (held-out rows of 64 tokens of the embedded corpus, fewer where the
    context is shorter) and logit effects of the kept features, for the viewer."""
    from tl_degeneracy.models.corpus import load_corpus
    from tl_degeneracy.viz.prompt_graph import graph_details

    try:
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None) or 64
        corpus = load_corpus(model.tokenizer, min(64, int(n_ctx)), "heldout")[:rows]
    except (FileNotFoundError, ValueError) as error:  # no corpus here, or too little of it
        warnings.warn(f"the viewer shows no contexts: {error}", stacklevel=2)
        corpus = None
    return graph.with_details(graph_details(model, graph, corpus))


def _next_folder(root: Path, kind: str) -> Path:
    """`root/001_lib`, `root/002_lib`, ...: the first unused, so no earlier graph is replaced."""
    n = 1
    while any(root.glob(f"{n:03d}_*")):
        n += 1
    return root / f"{n:03d}_{kind}"


def _write(
    job: PromptJob,
    graph: PromptGraph,
    check: InterventionResult,
    estimate: float,
    comparison: Any,
    top: list,
) -> Path:
    out = Path(job.out) if job.out else _next_folder(Path(job.study) / "prompt_graphs", job.kind)
    out.mkdir(parents=True, exist_ok=True)
    graph.save(out / "graph")
    graph.save_html(out / "graph.html")
    summary = {
        "prompt": job.prompt,
        "tokens": graph.tokens.tolist(),
        "target": graph.target,
        "value": graph.value,
        "kind": job.kind,
        "kept_nodes": graph.n_kept,
        "completeness": graph.completeness(),
        "top_supporting_nodes": [
            row
            for row in graph.nodes_table()
            if (row["site"], row["position"], row["feature"]) in {tuple(n) for n in top}
        ],
        "intervention": {
            "mode": check.mode,
            "before": check.before,
            "after": check.after,
            "change": check.delta,
            "first_order_estimate": estimate,
        },
    }
    if comparison is not None:
        comparison.save_json(out / "patching.json")
        comparison.save_html(out / "patching.html")
        summary["patching"] = comparison.to_json()
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1))
    return out

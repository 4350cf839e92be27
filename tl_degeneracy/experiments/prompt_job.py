"""The `prompt-graph` command's job: a fitted study's basis explains one prediction on the
user's own prompt (`engine.prompt_graph`), the graph's claim is checked by intervention against
random nodes, and, given a corrupted prompt, its nodes are set beside attribution and
activation patching.

The model is the study's own (its `fit` job records how it was loaded), so a folder written by
`tl-degeneracy fit` (or `fit-lm`, `demo`) is all it needs besides the prompt. Every request is
checked before the graph is built (a SmolLM2 graph takes tens of seconds)."""

from __future__ import annotations

import json
import shutil
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_degeneracy.engine.artifacts import jsonable
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.compat import as_dtype, model_cfg, usable_device
from tl_degeneracy.engine.progress import Log
from tl_degeneracy.engine.prompt_graph import PromptGraph, Target, prompt_graph
from tl_degeneracy.engine.prompt_graph.interventions import (
    InterventionResult,
    intervene,
    intervene_many,
)
from tl_degeneracy.engine.prompt_graph.nodes import ChainSite, site_chain
from tl_degeneracy.engine.sites import Positions, Site, SiteError, site_parts

__all__ = [
    "PromptJob",
    "PromptJobResult",
    "load_study_model",
    "parse_token_ids",
    "prompt_tokens",
    "run_prompt_job",
]


PATCHED_NODES = 5
"""Nodes per site patched each alone (side by side, in one forward) beside attribution
patching."""
SHOWN_SITES = 16
"""The per-site comparison is printed up to this many sites (always in `patching.html`)."""
RANDOM_DRAWS = 20
"""Random sets of as many nodes, at least as active as the top ones, the check compares with."""
OUTPUTS = ("graph", "graph.html", "summary.json", "patching.html", "patching.json")
"""What the job writes into its folder (and clears there before writing again)."""


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
    answer_id: int | None = None
    """The answer as a token id, in place of `answer` (any model)."""
    vs_id: int | None = None
    """The token it is compared with as an id, in place of `vs`."""
    corrupted: str | None = None
    """A prompt of the same token length to compare with patching (text, or ids)."""
    kind: str = "lib"
    positions: str | None = None
    """Positions that carry nodes; default: those every site of the graph was fitted at (all
    but BOS where the fit left it out; the last one where a site was read there only)."""
    top: int = 10
    node_share: float = 0.8
    compare_sites: tuple[str, ...] | None = None
    """Sites compared with patching (default: every site of the graph)."""
    details_rows: int = 48
    """Corpus rows whose contexts the viewer shows for each kept feature (0: none)."""
    model: str | None = None
    """The model (a preset or a folder) when the study does not record it, or to override."""
    tokenizer: str | None = None
    """A tokenizer folder, in place of the one the study's fit recorded."""
    device: str | None = None
    out: str | None = None
    seed: int = 0
    """Seed of the random node sets of the check."""


@dataclass
class PromptJobResult:
    """What `run_prompt_job` computed and where it wrote it."""

    graph: PromptGraph
    check: InterventionResult
    """The graph's `top` supporting nodes set to their mean together."""
    random_changes: list[float]
    """The same for `RANDOM_DRAWS` random sets of as many nodes at least as active."""
    comparison: Any
    """A `PatchingComparison` when a corrupted prompt was given, else None."""
    out: Path


# -- the study's model -----------------------------------------------------------------------


def _recorded_job(study: Path) -> dict[str, Any]:
    """How the study's fit loaded its model (`study.json` → metadata → job)."""
    record = study / "study.json"
    if not record.is_file():
        raise FileNotFoundError(
            f"{study} is not a saved study (no study.json): write one with "
            f"tl-degeneracy fit --out {study} first"
        )
    return dict(json.loads(record.read_text()).get("metadata", {}).get("job") or {})


def _recorded_path(value: Any, flag: str, folder: Path) -> str | None:
    """A path the study's fit recorded (a preset name as it is), checked to exist from here:
    a fit given a relative path recorded it relative to where it ran."""
    if value is None or value in ("smollm2", "modadd") or Path(str(value)).expanduser().exists():
        return None if value is None else str(value)
    raise FileNotFoundError(
        f"{folder} records {flag.lstrip('-')} {value!r} (as its fit was given it, relative to "
        f"where it ran), which is not found from here: pass {flag} PATH"
    )


def load_study_model(job: PromptJob) -> tuple[nn.Module, BasisResult, dict[str, Any]]:
    """The study's model (as its fit loaded it, or `job.model`), its basis of `job.kind`
    (checked against the model) and the fit job's record."""
    from tl_degeneracy.models.presets import load_preset

    folder = Path(job.study)
    recorded = _recorded_job(folder)
    spec = job.model or _recorded_path(recorded.get("model"), "--model", folder)
    if spec is None:
        raise ValueError(
            f"{folder} does not record its model (written by an older version, or by "
            "fit-modadd): name it with --model (a preset or a checkpoint folder)"
        )
    tokenizer = job.tokenizer or _recorded_path(recorded.get("tokenizer"), "--tokenizer", folder)
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
        tokenizer=tokenizer,
    )
    basis = BasisResult.load(folder / "bases" / job.kind, model=preset.model)
    used = {"model": str(spec), "tokenizer": tokenizer, "language_model": preset.language_model}
    return preset.model, basis, {**recorded, "used": used}


# -- the request ------------------------------------------------------------------------------


def prompt_tokens(
    model: nn.Module, text: str | None, ids: tuple[int, ...] | None, flag: str
) -> Int[Tensor, "1 pos"]:
    """One prompt as a `[1, pos]` row: text through the model's tokenizer (BOS first where it
    has one, as the corpus rows the fit read), or ids as given."""
    if ids is not None:
        if not ids:
            raise ValueError(f"{flag} gives no token ids")
        return torch.tensor([list(ids)], dtype=torch.long)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"the model has no tokenizer to read {flag} with: give token ids instead")
    if not str(text).strip():
        raise ValueError(f"{flag} is empty: give the text of a prompt")
    from tl_degeneracy.models.corpus import prompt_batches

    return prompt_batches([str(text)], tokenizer)[0]


def checked_prompt(model: nn.Module, tokens: Tensor, flag: str) -> Tensor:
    """`tokens` checked against the model's context and vocabulary, the error naming `flag`
    (before anything is computed)."""
    from tl_degeneracy.engine.tokens import TokenError, validate_tokens

    n_ctx = getattr(model_cfg(model), "n_ctx", None)
    if n_ctx is not None and tokens.shape[1] > int(n_ctx):
        raise ValueError(
            f"{flag} is {tokens.shape[1]} tokens, longer than the model's context of {n_ctx}: "
            "give a shorter prompt"
        )
    try:
        return validate_tokens(model, tokens)
    except TokenError as error:
        raise ValueError(f"{flag}: {str(error).split('. ')[0]}") from None


def parse_token_ids(text: str, flag: str) -> tuple[int, ...]:
    """Token ids as the command line writes them (`5 7 113` or `5,7,113`)."""
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(
            f"{flag} {text!r}: give token ids as integers separated by spaces or commas "
            "(as the prompt is given)"
        ) from None


def _in_vocabulary(model: nn.Module, token_id: int, flag: str) -> int:
    d_vocab = int(getattr(model_cfg(model), "d_vocab", 0) or 0)
    if not 0 <= token_id < d_vocab:
        raise ValueError(
            f"{flag} {token_id} is outside this model's vocabulary of {d_vocab} tokens "
            f"(ids 0 to {d_vocab - 1})"
        )
    return token_id


def _token_id(model: nn.Module, token: str, flag: str) -> int:
    """A single token named by its text (or, without a tokenizer, its id), in the vocabulary."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        try:
            token_id = int(token)
        except ValueError:
            raise ValueError(
                f"{flag} {token!r}: this model has no tokenizer, so name the token by its id "
                "(an integer)"
            ) from None
        return _in_vocabulary(model, token_id, flag)
    ids = list(tokenizer.encode(token, add_special_tokens=False))
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"{flag} {token!r} is {len(ids)} tokens for this tokenizer ({pieces}): give a "
            "single token (a word mid-sentence usually starts with a space, e.g. ' Mary')"
        )
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None and ids[0] == unknown and token != tokenizer.decode([unknown]):
        warnings.warn(
            f"{flag} {token!r} is not in the tokenizer's vocabulary: it reads as its unknown "
            f"token {tokenizer.decode([unknown])!r}",
            UserWarning,
            stacklevel=2,
        )
    return int(ids[0])


def _label(model: nn.Module, token: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return repr(tokenizer.decode([token])) if tokenizer is not None else str(token)


@torch.no_grad()
def choose_target(
    model: nn.Module,
    tokens: Int[Tensor, "1 pos"],
    answer: str | int | None,
    vs: str | int | None,
) -> Target:
    """`logit(answer) − logit(vs)` at the last position, each a token's text (an id without
    a tokenizer) or an `int` id; a token left out is the model's most likely one (other than
    the answer, for `vs`)."""
    from tl_degeneracy.engine.tokens import validate_tokens

    def resolve(token: str | int | None, flag: str) -> int | None:
        if token is None:
            return None
        if isinstance(token, int):
            return _in_vocabulary(model, token, f"{flag}-id")
        return _token_id(model, token, flag)

    good, bad = resolve(answer, "--answer"), resolve(vs, "--vs")
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


def graph_positions(
    job: PromptJob, chain: list[ChainSite], n_pos: int
) -> tuple[Positions, list[str]]:
    """The positions that carry nodes, and a warning per site read where it was not fitted.
    Default: the positions every site of the graph was fitted at on this prompt (the fit's
    `1:` on a language model; the last where a site was fitted there only)."""
    fitted = {c.name: _fitted_positions(c.basis.site, n_pos) for c in chain}
    if job.positions is None:
        shared = sorted(set.intersection(*fitted.values()))
        if n_pos - 1 not in shared:
            each = "; ".join(f"{name} at {sorted(f)}" for name, f in fitted.items())
            raise ValueError(
                f"the graph's sites were fitted at positions that do not all include the last "
                f"one ({n_pos - 1}), where the target is read ({each}): choose positions with "
                "--positions (e.g. last), which warns where a site was not fitted"
            )
        first = chain[0].basis.site.positions  # the fit's own spec ("1:") where it serves
        same = isinstance(first, str) and all(set(shared) == f for f in fitted.values())
        positions: Positions = first if same else tuple(shared)
    else:
        from tl_degeneracy.experiments.fit_job import parse_positions

        try:
            positions = parse_positions(job.positions)
        except ValueError:
            raise ValueError(
                f"--positions {job.positions!r} is not understood: give all, last, a slice "
                "like 1: or 1:8, or comma-separated indices like 0,3,-1"
            ) from None
    wanted = set(Site(chain[0].basis.site.hook, positions).index(n_pos).tolist())
    if n_pos - 1 not in wanted:
        raise ValueError(
            f"positions {positions!r} leave out the last position ({n_pos - 1}), where the "
            "target is read: no influence could reach a node; include it (e.g. --positions 1:)"
        )
    notes = [
        f"{name} was fitted at positions {sorted(f)} of this prompt, not at "
        f"{sorted(wanted - f)}: its features there are outside the fit's data"
        for name, f in fitted.items()
        if wanted - f
    ]
    return positions, notes


def _fitted_positions(site: Any, n_pos: int) -> set[int]:
    """The positions of an `n_pos`-token prompt a site was fitted at (listed positions past
    its end left out)."""
    if isinstance(site.positions, tuple):
        return {p % n_pos for p in site.positions if -n_pos <= p < n_pos}
    return set(site.index(n_pos).tolist())


def _composite(model: nn.Module, name: str) -> bool:
    """Whether a site named on the command line (`hook`, `hook[positions]`) is a composite
    one; an unknown name is left to `site_chain` to name."""
    try:
        return len(site_parts(model, Site(name.split("[", 1)[0]))) > 1
    except (SiteError, KeyError):
        return False


def _compare_sites(
    model: nn.Module, basis: BasisResult, job: PromptJob, positions: Positions
) -> list[str] | None:
    """`--compare-sites` checked before anything is computed (forward order, as the graph)."""
    if job.compare_sites is None:
        return None
    if job.corrupted is None:
        raise ValueError(
            "--compare-sites chooses the sites compared with patching: add --corrupted"
        )
    chain: list[ChainSite] = []
    for name in dict.fromkeys(job.compare_sites):  # each once, put in forward order below
        if _composite(model, name):
            raise ValueError(
                f"--compare-sites {name}: a composite MLP or attention site; the graph and its "
                "comparison with patching take residual-stream sites (hook_resid_*)"
            )
        try:
            chain += site_chain(model, basis, [name], positions)
        except KeyError as error:
            raise ValueError(f"--compare-sites: {error.args[0]}") from None
    order = {b.site.name: i for i, b in enumerate(basis.bases.values())}
    return [c.name for c in sorted(chain, key=lambda c: order[c.basis.site.name])]


# -- the job -----------------------------------------------------------------------------------


def run_prompt_job(job: PromptJob, log: Log = print) -> PromptJobResult:
    """Build, check and write the prompt graph of `job` (see the module docstring)."""
    from tl_degeneracy.engine.prompt_graph.compare import compare_with_patching

    if (job.prompt is None) == (job.token_ids is None):
        raise ValueError("give the prompt as text (--prompt) or as token ids (--token-ids)")
    out = _out_folder(job)
    model, basis, recorded = load_study_model(job)
    given = "--prompt" if job.token_ids is None else "--token-ids"
    tokens = checked_prompt(model, prompt_tokens(model, job.prompt, job.token_ids, given), given)
    corrupted = None
    if job.corrupted is not None:
        ids = parse_token_ids(job.corrupted, "--corrupted") if job.token_ids is not None else None
        corrupted = prompt_tokens(model, job.corrupted, ids, "--corrupted")
        corrupted = checked_prompt(model, corrupted, "--corrupted")
        if corrupted.shape != tokens.shape:
            raise ValueError(
                f"--corrupted is {corrupted.shape[1]} tokens and the prompt {tokens.shape[1]}: "
                "patching compares positions one to one, so give prompts of equal token length"
            )
        if torch.equal(corrupted, tokens):
            raise ValueError("--corrupted is the prompt itself: there is nothing to patch")
    answer = job.answer_id if job.answer_id is not None else job.answer
    target = choose_target(model, tokens, answer, job.vs_id if job.vs_id is not None else job.vs)
    positions, notes = graph_positions(job, site_chain(model, basis), tokens.shape[1])
    for note in notes:
        log(f"note: {note}")
    compare_sites = _compare_sites(model, basis, job, positions)
    log(f"prompt: {tokens.shape[1]} tokens; target {target.name} at the last position")
    graph = prompt_graph(
        model, basis, tokens, target, positions=positions, node_share=job.node_share
    )
    if job.details_rows > 0 and recorded["used"]["language_model"]:
        graph = _with_details(model, graph, job.details_rows)
    log(graph.completeness_summary())
    top = graph.top_nodes(job.top, sign="supporting")
    check, random_changes = _check(model, basis, tokens, target, graph, top, job.seed)
    log(_check_line(check, random_changes))
    comparison = None
    if corrupted is not None:
        comparison = compare_with_patching(
            model, basis, tokens, corrupted, target, compare_sites, positions, top=PATCHED_NODES
        )
        comparison.metadata.update(
            clean_prompt=_text(job.prompt, tokens), corrupted_prompt=_text(job.corrupted, corrupted)
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
    _write(
        out,
        job,
        recorded["used"],
        positions,
        graph,
        top,
        check,
        random_changes,
        corrupted,
        comparison,
    )
    log(f"wrote {out} (graph.html, graph/, summary.json{', patching.html' if comparison else ''})")
    return PromptJobResult(graph, check, random_changes, comparison, out)


def _text(text: str | None, tokens: Tensor) -> str:
    return text if text is not None else " ".join(map(str, tokens[0].tolist()))


def _check(
    model: nn.Module,
    basis: BasisResult,
    tokens: Tensor,
    target: Target,
    graph: PromptGraph,
    top: list,
    seed: int,
) -> tuple[InterventionResult, list[float]]:
    """The top supporting nodes set to their mean together, and up to `RANDOM_DRAWS` distinct
    random sets of as many feature nodes whose |activation| is at least the smallest of theirs
    (the graph's nodes carry the prediction when they move the target more than such nodes
    do); none where no more such nodes than the top ones exist."""
    from tl_degeneracy.experiments.prompt_graph_ioi import random_nodes_like

    check = intervene(model, basis, tokens, target, top, mode="mean")
    draws, pool = random_nodes_like(graph, top, RANDOM_DRAWS, torch.Generator().manual_seed(seed))
    if pool <= len(top):  # every draw would be the whole pool: no random comparison
        return check, []
    distinct = {frozenset(d): d for d in draws}  # a small pool has fewer sets than draws
    draws = list(distinct.values())
    before, after = intervene_many(model, basis, tokens, target, draws, mode="mean")
    return check, [float(a) - before for a in after.tolist()]


def _check_line(check: InterventionResult, random_changes: list[float]) -> str:
    line = (
        f"the {len(check.nodes)} most influential supporting nodes set to their mean together: "
        f"{check.before:.4g} -> {check.after:.4g} (change {check.delta:+.4g})"
    )
    if not random_changes:
        return line + (
            f"; fewer than {len(check.nodes) + 1} other nodes are at least as active, so there "
            "is no random set to compare with"
        )
    beaten = sum(abs(r) < abs(check.delta) for r in random_changes) / len(random_changes)
    return line + (
        f"; {len(random_changes)} random sets of as many nodes at least as active: median "
        f"|change| {statistics.median(abs(r) for r in random_changes):.4g}, below the top "
        f"nodes' in {beaten:.0%} of them"
    )


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


# -- the output folder --------------------------------------------------------------------------


def _next_folder(root: Path, kind: str) -> Path:
    """`root/001_lib`, `root/002_lib`, ...: the first unused, so no earlier graph is replaced."""
    n = 1
    while any(root.glob(f"{n:03d}_*")):
        n += 1
    return root / f"{n:03d}_{kind}"


def _out_folder(job: PromptJob) -> Path:
    """Where the job writes: `--out` (new, empty, or an earlier prompt graph's folder, whose
    files are replaced; never a study or a folder of other files), else the study's next
    numbered folder."""
    if job.out is None:
        return _next_folder(Path(job.study) / "prompt_graphs", job.kind)
    out = Path(job.out)
    if (out / "study.json").exists():
        raise ValueError(
            f"--out {out} is a study folder: its summary.json would be replaced; leave --out "
            "out (the study's prompt_graphs/ gets the next numbered folder) or give another"
        )
    others = [p.name for p in out.iterdir() if p.name not in OUTPUTS] if out.is_dir() else []
    summary = out / "summary.json"
    if summary.is_file() and not _is_prompt_summary(summary):
        others.append(summary.name)
    if others:
        raise ValueError(
            f"--out {out} holds other files ({', '.join(sorted(others)[:3])}): give a new or "
            "empty folder, or one an earlier prompt-graph wrote"
        )
    return out


def _is_prompt_summary(path: Path) -> bool:
    """Whether `path` is the `summary.json` of an earlier prompt graph."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"study", "target", "intervention"} <= set(record)


def _write(
    out: Path,
    job: PromptJob,
    used: dict[str, Any],
    positions: Positions,
    graph: PromptGraph,
    top: list,
    check: InterventionResult,
    random_changes: list[float],
    corrupted: Tensor | None,
    comparison: Any,
) -> None:
    """The graph, its page, `summary.json` and the comparison, replacing an earlier run's
    files in `out` (none of them is left from another prompt)."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    graph.save(out / "graph")
    graph.save_html(out / "graph.html")
    chosen = {tuple(n) for n in top}
    summary = {
        "study": str(Path(job.study).resolve()),
        "model": used["model"],
        "tokenizer": used["tokenizer"],
        "kind": job.kind,
        "prompt": job.prompt,
        "answer": job.answer,
        "vs": job.vs,
        "top": job.top,
        "tokens": graph.tokens.tolist(),
        "target": graph.target,
        "value": graph.value,
        "positions": positions,
        "node_share": job.node_share,
        "kept_nodes": graph.n_kept,
        "completeness": graph.completeness(),
        "top_supporting_nodes": [
            row
            for row in graph.nodes_table()
            if (row["site"], row["position"], row["feature"]) in chosen
        ],
        "intervention": {
            "mode": check.mode,
            "before": check.before,
            "after": check.after,
            "change": check.delta,
            "random_changes": random_changes,
            "random_nodes_seed": job.seed,
        },
    }
    if comparison is not None and corrupted is not None:
        comparison.save_json(out / "patching.json")
        comparison.save_html(out / "patching.html")
        summary["corrupted"] = job.corrupted
        summary["corrupted_tokens"] = corrupted[0].tolist()
        summary["patching"] = comparison.to_json()
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1))

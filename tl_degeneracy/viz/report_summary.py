"""The numbers a study report leads with, and their reading in plain words.

Features needed at a loss tolerance (node ablation), edges needed for a share of the edge weight
(per section), the dominant-direction check and the attribution check, each as a table row set
and as a sentence; and the settings and timings as readable rows (no Python reprs).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

from tl_degeneracy.viz.graph_widget import short_site_label

if TYPE_CHECKING:
    from tl_degeneracy.engine.ablation import AblationCurve
    from tl_degeneracy.engine.attribution import AttributionComparison
    from tl_degeneracy.engine.diagnostics import SinkDiagnostic
    from tl_degeneracy.engine.edges import SectionEdges

__all__ = [
    "ablation_sentences",
    "ordered_kinds",
    "run_sentence",
    "attribution_sentence",
    "diagnostic_sentence",
    "duration",
    "edge_sentences",
    "edges_needed",
    "features_needed",
    "metric_intro",
    "setting_rows",
    "timing_rows",
]


def duration(seconds: float) -> str:
    """`83.2` -> `1 min 23 s`; `4.25` -> `4.2 s`; `3725` -> `1 h 02 min`."""
    if not math.isfinite(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def ordered_kinds(by_kind: Mapping[str, Any]) -> list[str]:
    """Kinds with LIB first, then the others in their order."""
    return sorted(by_kind, key=lambda k: (k != "lib", list(by_kind).index(k)))


def features_needed(
    curves: Mapping[str, Mapping[str, AblationCurve]], tolerance: float
) -> dict[str, dict[str, int | None]]:
    """{site: {kind: the fewest kept features (of those evaluated) whose score stays within
    `tolerance` of the unablated score, None if none does or it cannot be decided (a NaN
    score; `AblationCurve.min_k`)}}."""
    return {
        site: {kind: c.min_k(tolerance) for kind, c in by_kind.items()}
        for site, by_kind in curves.items()
    }


def _k_text(k: int | None, curve: AblationCurve) -> str:
    if k is not None:
        return str(k)
    if curve.undecided:
        return "undecided (NaN scores)"
    return f"more than {max(curve.scores)}"


def ablation_sentences(
    curves: Mapping[str, Mapping[str, AblationCurve]], tolerance: float, metric: str
) -> list[str]:
    """Per ablated site what each kind needs, then the tally LIB vs PCA and its meaning."""
    if not curves:
        return []
    needed = features_needed(curves, tolerance)
    parts = []
    for site, by_kind in curves.items():
        kinds = ordered_kinds(by_kind)
        base = by_kind[kinds[0]].baseline
        ks = [f"{k.upper()} {_k_text(needed[site][k], by_kind[k])}" for k in kinds]
        parts.append(f"at {site}, {', '.join(ks)} (unablated {base:.4g})")
    out = [
        f"Features needed to keep the {metric} within {tolerance:g} of its unablated value "
        "when only a basis's top k features are kept at one site: " + "; ".join(parts) + "."
    ]
    both = [(n["lib"], n["pca"]) for n in needed.values() if "lib" in n and "pca" in n]
    decided = []  # sites where neither curve is undecided (NaN): only they are compared
    for site, by_kind in curves.items():
        if "lib" in by_kind and "pca" in by_kind:
            if not (by_kind["lib"].undecided or by_kind["pca"].undecided):
                decided.append((needed[site]["lib"], needed[site]["pca"]))
    undecided = len(both) - len(decided)
    pairs = [(a, b) for a, b in decided if a is not None or b is not None]
    if both:
        inf = float("inf")
        lib = [inf if a is None else a for a, _ in pairs]
        pca = [inf if b is None else b for _, b in pairs]
        fewer = sum(a < b for a, b in zip(lib, pca))
        more = sum(a > b for a, b in zip(lib, pca))
        same = len(pairs) - fewer - more
        tally = (
            f"LIB needs fewer features than PCA at {fewer} of {len(both)} ablated sites, "
            f"as many at {same} and more at {more}"
        )
        neither = len(decided) - len(pairs)
        if neither:
            tally += f"; at {neither} no evaluated k of either basis is within the tolerance"
        if undecided:
            tally += f"; at {undecided} a NaN score leaves it undecided"
        tally += "."
        if fewer > more:
            tally += (
                " Fewer features for the same loss means LIB's ranking (by how strongly a "
                "direction interacts with what comes after it) puts what the model's output "
                "depends on first, where PCA's ranking by variance does not."
            )
        elif more > fewer:
            tally += (
                " Here the directions of largest variance keep the loss with fewer features: "
                "LIB's ranking does not beat variance at these sites."
            )
        out.append(tally)
    return out


def edges_needed(
    edges: Mapping[str, Mapping[str, SectionEdges]], fraction: float = 0.99
) -> dict[str, dict[str, int]]:
    """{section: {kind: fewest edges that carry `fraction` of the section's edge weight}}."""
    out: dict[str, dict[str, int]] = {}
    for kind in ordered_kinds(edges):
        for name, se in edges[kind].items():
            out.setdefault(name, {})[kind] = se.edges_for_fraction(fraction)
    return out


def edge_sentences(
    edges: Mapping[str, Mapping[str, SectionEdges]], fraction: float = 0.99
) -> list[str]:
    """Median edges for `fraction` of the weight per kind, the LIB-vs-PCA tally, and a warning
    when single edges carry it (one dominant direction)."""
    if not any(edges.values()):
        return []
    needed = edges_needed(edges, fraction)
    kinds = ordered_kinds(edges)
    first = next(iter(edges[kinds[0]].values()))
    medians = ", ".join(
        f"{statistics.median([n[k] for n in needed.values() if k in n]):g} for {k.upper()}"
        for k in kinds
    )
    out = [
        f"Edges needed for {fraction:.0%} of the edge weight of a section (edges measured into "
        f"the top {first.edges.shape[0]} features of each site, {first.total_edges:,} in the "
        f"first section): median {medians}, over {len(needed)} sections."
    ]
    if "lib" in kinds and "pca" in kinds:
        both = [n for n in needed.values() if "lib" in n and "pca" in n]
        fewer = sum(n["lib"] < n["pca"] for n in both)
        out.append(
            f"LIB needs fewer edges than PCA in {fewer} of {len(both)} sections. Fewer edges "
            "carrying the weight means each feature is computed from a few features of the "
            "site before it: a sparser graph, and a circuit easier to read."
        )
    single = {k: sum(n.get(k) == 1 for n in needed.values()) for k in kinds}
    if any(single.values()):
        counts = ", ".join(f"{v} for {k.upper()}" for k, v in single.items())
        out.append(
            f"A single edge carries {fraction:.0%} of the weight in some sections ({counts}): "
            "usually one direction dominating the sites (see Dominant directions)."
        )
    return out


def diagnostic_sentence(diag: SinkDiagnostic | None) -> str:
    """Whether any site has a direction with more than the threshold of its variance."""
    if diag is None or not diag.shares:
        return ""
    if not diag.directions:
        site, share = max(diag.shares.items(), key=lambda kv: kv[1])
        return (
            f"No site has a direction carrying more than {diag.threshold:.0%} of its variance "
            f"(the largest share is {share:.1%}, at {short_site_label(site)})."
        )
    names = [short_site_label(d.site) for d in diag.directions]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    firsts: dict[tuple[str, Any], str] = {}  # the first site of each kind of source
    for d in diag.directions:
        firsts.setdefault(d.source, d.explanation())
    return (
        f"{len(names)} of {len(diag.shares)} sites have one direction carrying more than "
        f"{diag.threshold:.0%} of the variance ({shown}); their spectra and edges describe "
        "mostly that direction. " + " ".join(list(firsts.values())[:3])
    )


def attribution_sentence(comparisons: Mapping[str, AttributionComparison]) -> str:
    """Median Spearman ρ(attribution, patching) per kind over the compared sites."""
    if not comparisons:
        return ""
    parts = []
    pairs = None
    for kind in ordered_kinds(comparisons):
        comp = comparisons[kind]
        pairs = comp.metadata.get("n_pairs", pairs)
        rhos = [r["attribution~patching"] for r in comp.correlations().values()]
        rhos = [r for r in rhos if math.isfinite(r)]
        if rhos:
            parts.append(f"{statistics.median(rhos):.2f} for {kind.upper()}")
    if not parts:
        return ""
    return (
        f"On {pairs} indirect-object prompt pairs, attribution patching orders features like "
        f"true patching with a median Spearman ρ of {', '.join(parts)} (over sites; 1 is the "
        "same order): how far a first-order estimate can stand in for patching each feature."
    )


def metric_intro(name: object) -> str:
    """The words "Metric NAME" for a sentence that goes on with ": clean …", or "Metric" alone
    when no name was given (none, or a function's default name such as "metric" or
    "<lambda>")."""
    text = str(name or "").strip()
    return "Metric" if text in ("", "metric", "<lambda>") else f"Metric {text}"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) if v else "–"
    return str(v)


def setting_rows(settings: Mapping[str, Any], prefix: str = "") -> list[dict[str, str]]:
    """`{"truncation": {"relative": 1e-10}}` -> a row `truncation relative | 1e-10`; lists
    are joined, booleans read yes/no, dataclasses are expanded."""
    rows: list[dict[str, str]] = []
    for key, value in settings.items():
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        name = f"{prefix}{str(key).replace('_', ' ')}"
        if isinstance(value, Mapping):
            rows += setting_rows(value, f"{name} ")
        else:
            rows.append({"setting": name, "value": _value(value)})
    return rows


_PHASES = {"total": "total (wall clock)", "cpu_total": "CPU time, all threads"}


def timing_rows(timings: Mapping[str, float]) -> list[dict[str, str]]:
    """One row per phase: its name, duration and share of the total wall time."""
    total = timings.get("total_s") or sum(
        v for k, v in timings.items() if not k.startswith(("total", "cpu"))
    )
    rows = []
    for key, seconds in timings.items():
        name = key[:-2] if key.endswith("_s") else key
        share = "" if key.startswith(("total", "cpu")) or not total else f"{seconds / total:.0%}"
        rows.append(
            {
                "phase": _PHASES.get(name, name.replace("_", " ")),
                "time": duration(seconds),
                "share": share,
            }
        )
    return rows


def run_sentence(
    model: Mapping[str, Any],
    kinds: Sequence[str],
    n_sites: int,
    width: int,
    n_tokens: int | None,
    sections: Mapping[str, SectionEdges],
    total_s: float | None,
) -> str:
    """Model, sites, data and time in one sentence."""
    name = model.get("model_name") or "the model"
    blocks = f"{model['n_layers']} blocks, " if model.get("n_layers") else ""
    text = (
        f"{name} ({blocks}width {width}): {' and '.join(k.upper() for k in kinds)} at "
        f"{n_sites} sites"
    )
    if n_tokens:
        text += f", fitted on {n_tokens:,} token positions"
    if sections:
        count = next(iter(sections.values())).count
        text += f"; edges of {len(sections)} sections on {count:,} token positions"
    if total_s:
        text += f"; {duration(total_s)} in all"
    return text + "."

"""A `PromptGraph` as an artifact (the result protocol, `engine.artifacts`): its tensors, its
JSON metadata, and the graph rebuilt from both."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tl_degeneracy.engine.artifacts import ArtifactError, check_saved
from tl_degeneracy.engine.prompt_graph.edges import CandidateGraph
from tl_degeneracy.engine.prompt_graph.graph import PromptGraph, PromptGraphConfig

FORMAT = "tl_degeneracy.prompt_graph/1"
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"
_CANDIDATE_FIELDS = [f.name for f in dataclasses.fields(CandidateGraph)]
_EDGE_FIELDS = ("src", "dst", "weight")
_PER_SITE = ("site_positions", "features", "attributions", "rest")


def graph_tensors(graph: PromptGraph) -> dict[str, torch.Tensor]:
    """Every tensor of the graph, flat (per-site lists as `name/layer`)."""
    tensors: dict[str, torch.Tensor] = {
        "tokens": graph.tokens,
        "site_totals": graph.site_totals,
        "embedding": graph.embedding,
        "influence": graph.influence,
        "kept_nodes": graph.kept_nodes.to(torch.uint8),
        "kept_edges": graph.kept_edges.to(torch.uint8),
    }
    for name in _PER_SITE:
        for layer, t in enumerate(getattr(graph, name)):
            tensors[f"{name}/{layer}"] = t
    for name in _CANDIDATE_FIELDS:
        tensors[f"candidates/{name}"] = getattr(graph.candidates, name)
    return tensors


def graph_metadata(graph: PromptGraph) -> dict[str, Any]:
    """Everything else, as JSON data (the graph's `metadata` holds the model's identity)."""
    return {
        **graph.metadata,
        "format": FORMAT,
        "str_tokens": graph.str_tokens,
        "graph_sites": graph.sites,
        "target": graph.target,
        "value": graph.value,
        "config": dataclasses.asdict(graph.config),
        "graph_metadata": graph.metadata,
        "details": graph.details,
    }


def _config(d: dict[str, Any]) -> PromptGraphConfig:
    d = dict(d)
    if isinstance(d.get("positions"), list):
        d["positions"] = tuple(d["positions"])
    if isinstance(d.get("sites"), list):
        d["sites"] = tuple(d["sites"])
    return PromptGraphConfig(**d)


_KEYS = {
    "str_tokens": [str],
    "graph_sites": [str],
    "target": {"name": str, "position": int, "kind?": str},
    "value": float,
    "config": dict,
    "graph_metadata?": dict,
    "details?": (dict, None),
}
"""The metadata a `PromptGraph` is rebuilt from and the viewer reads (`check_saved`)."""


def check_graph_artifact(
    t: dict[str, torch.Tensor], meta: dict[str, Any], folder: Path | None = None
) -> None:
    """Refuse (`ArtifactError` naming the file and entry) a saved graph of another format,
    without an entry it is rebuilt from, or whose tensors do not fit together: one per token,
    per site, per candidate node and per candidate edge."""
    where = Path() if folder is None else folder
    if meta.get("format") != FORMAT:
        found = repr(meta["format"]) if "format" in meta else "missing"
        raise ArtifactError(
            f"{where / METADATA_FILE}: 'format' is {found} where a saved prompt graph has "
            f"{FORMAT!r}: this is not a graph this version reads, or the file was edited; "
            "restore it or build the graph again"
        )

    def shapes(meta: dict[str, Any]) -> dict[str, tuple[int | str, ...]]:
        n_tokens, n_sites = len(meta["str_tokens"]), len(meta["graph_sites"])
        out: dict[str, tuple[int | str, ...]] = {
            "tokens": (n_tokens,),
            "embedding": (n_tokens,),
            "site_totals": (n_sites,),
            "influence": ("nodes",),
            "kept_nodes": ("nodes",),
            "kept_edges": ("edges",),
        }
        for layer in range(n_sites):
            p, k = f"positions of site {layer}", f"features of site {layer}"
            out |= {f"site_positions/{layer}": (p,), f"rest/{layer}": (p,)}
            out |= {f"features/{layer}": (p, k), f"attributions/{layer}": (p, k)}
        for name in _CANDIDATE_FIELDS:
            out[f"candidates/{name}"] = ("edges",) if name in _EDGE_FIELDS else ("nodes",)
        return out

    check_saved(folder, "prompt graph", meta, t, _KEYS, shapes)


def graph_from_artifact(t: dict[str, torch.Tensor], meta: dict[str, Any]) -> PromptGraph:
    """The graph of `graph_tensors` and `graph_metadata`, checked (`check_graph_artifact`;
    `Result.load` names the folder)."""
    check_graph_artifact(t, meta)
    n_sites = len(meta["graph_sites"])
    per_site = {name: [t[f"{name}/{layer}"] for layer in range(n_sites)] for name in _PER_SITE}
    site_positions, features, attributions, rest = (per_site[n] for n in _PER_SITE)
    candidates = CandidateGraph(**{n: t[f"candidates/{n}"] for n in _CANDIDATE_FIELDS})
    return PromptGraph(
        tokens=t["tokens"],
        str_tokens=list(meta["str_tokens"]),
        sites=list(meta["graph_sites"]),
        target=meta["target"],
        value=float(meta["value"]),
        site_totals=t["site_totals"],
        embedding=t["embedding"],
        candidates=candidates,
        influence=t["influence"],
        kept_nodes=t["kept_nodes"].bool(),
        kept_edges=t["kept_edges"].bool(),
        config=_config(meta["config"]),
        metadata=meta.get("graph_metadata", {}),
        details=meta.get("details"),
        site_positions=site_positions,
        features=features,
        attributions=attributions,
        rest=rest,
    )

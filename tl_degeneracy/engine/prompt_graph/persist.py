"""A `PromptGraph` as an artifact (the result protocol, `engine.artifacts`): its tensors, its
JSON metadata, and the graph rebuilt from both."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tl_degeneracy.engine.artifacts import ArtifactError
from tl_degeneracy.engine.prompt_graph.edges import CandidateGraph
from tl_degeneracy.engine.prompt_graph.graph import PromptGraph, PromptGraphConfig

FORMAT = "tl_degeneracy.prompt_graph/1"
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"
_CANDIDATE_FIELDS = [f.name for f in dataclasses.fields(CandidateGraph)]
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


def graph_from_artifact(t: dict[str, torch.Tensor], meta: dict[str, Any]) -> PromptGraph:
    """The graph of `graph_tensors` and `graph_metadata`."""
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"this folder holds {meta.get('format')!r}, not a {FORMAT} graph")
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

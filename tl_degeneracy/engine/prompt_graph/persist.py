"""Saving and loading a `PromptGraph`: safetensors for the tensors, JSON for the rest (never
pickle), with a checksum of the tensor file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tl_degeneracy.engine.artifacts import ArtifactError, package_version
from tl_degeneracy.engine.prompt_graph.edges import CandidateGraph
from tl_degeneracy.engine.prompt_graph.graph import PromptGraph, PromptGraphConfig

FORMAT = "tl_degeneracy.prompt_graph/1"
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"
_CANDIDATE_FIELDS = [f.name for f in dataclasses.fields(CandidateGraph)]
_PER_SITE = ("site_positions", "features", "attributions", "rest")


def save_graph(graph: PromptGraph, path: str | Path) -> Path:
    """Write the graph to a folder (created if missing)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
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
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(plain, str(folder / TENSORS_FILE))
    meta = {
        "format": FORMAT,
        "tl_degeneracy": package_version(),
        "str_tokens": graph.str_tokens,
        "sites": graph.sites,
        "target": graph.target,
        "value": graph.value,
        "config": dataclasses.asdict(graph.config),
        "metadata": graph.metadata,
        "details": graph.details,
        "tensors_sha256": hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest(),
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1, allow_nan=True))
    return folder


def _config(d: dict[str, Any]) -> PromptGraphConfig:
    d = dict(d)
    if isinstance(d.get("positions"), list):
        d["positions"] = tuple(d["positions"])
    if isinstance(d.get("sites"), list):
        d["sites"] = tuple(d["sites"])
    return PromptGraphConfig(**d)


def load_graph(path: str | Path) -> PromptGraph:
    """Read a graph written by `save_graph`; corrupted or foreign folders raise
    `ArtifactError` saying what is wrong."""
    folder = Path(path)
    meta_path, tensor_path = folder / METADATA_FILE, folder / TENSORS_FILE
    if not meta_path.exists() or not tensor_path.exists():
        raise ArtifactError(
            f"{folder} is not a saved prompt graph: expected {METADATA_FILE} and {TENSORS_FILE}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_path} is corrupted (invalid JSON: {e})") from e
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{folder} holds {meta.get('format')!r}, not a {FORMAT} prompt graph")
    if meta.get("tensors_sha256") != hashlib.sha256(tensor_path.read_bytes()).hexdigest():
        raise ArtifactError(f"{tensor_path} is corrupted: its checksum does not match")
    try:
        t = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{tensor_path} is corrupted ({e})") from e
    n_sites = len(meta["sites"])
    per_site = {name: [t[f"{name}/{layer}"] for layer in range(n_sites)] for name in _PER_SITE}
    site_positions, features, attributions, rest = (per_site[n] for n in _PER_SITE)
    candidates = CandidateGraph(**{n: t[f"candidates/{n}"] for n in _CANDIDATE_FIELDS})
    return PromptGraph(
        tokens=t["tokens"],
        str_tokens=list(meta["str_tokens"]),
        sites=list(meta["sites"]),
        target=meta["target"],
        value=float(meta["value"]),
        site_totals=t["site_totals"],
        embedding=t["embedding"],
        candidates=candidates,
        influence=t["influence"],
        kept_nodes=t["kept_nodes"].bool(),
        kept_edges=t["kept_edges"].bool(),
        config=_config(meta["config"]),
        metadata=meta.get("metadata", {}),
        details=meta.get("details"),
        site_positions=site_positions,
        features=features,
        attributions=attributions,
        rest=rest,
    )

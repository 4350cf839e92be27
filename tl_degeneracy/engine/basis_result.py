"""Fitted bases at a list of sites (`BasisResult`): per site `C`, `C⁺`, importances, mean and
Gram spectrum, with the metadata of the fit; saved and loaded through the result protocol
(`engine.artifacts`), so a basis refuses a model it was not fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor

from tl_degeneracy.engine.artifacts import METADATA_FILE, TENSORS_FILE, ArtifactError, Result
from tl_degeneracy.engine.bases import BasisKind, SiteBasis
from tl_degeneracy.engine.sites import Site, SiteLike, site_key

_FIELDS = ("C", "C_pinv", "importance", "mean", "gram_eigenvalues", "full_spectrum")
BASIS_KINDS: tuple[str, ...] = get_args(BasisKind)
"""Kinds of site bases (and of a whole fit: `LIBConfig.kind` is one of them)."""
PINV_TOLERANCE = 1e-3
"""How far `C⁺C` of a loaded basis may be from the identity (every fit makes it the identity
up to float64 rounding: at most 7e-8 over 139 saved bases of modular addition, an MLP and
SmolLM2); a transposed or mismatched `C` is O(1) from it."""


@dataclass
class BasisResult(Result):
    """Fitted bases keyed by site name, in forward order, with their metadata."""

    bases: dict[str, SiteBasis]
    metadata: dict[str, Any]

    ARTIFACT = "basis"

    @property
    def sites(self) -> list[Site]:
        return [b.site for b in self.bases.values()]

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", "?"))

    def __getitem__(self, site: SiteLike) -> SiteBasis:
        """The basis at a site given as a `Site`, its name or a short form such as
        `("resid_mid", 1)`; `KeyError` naming the sites for one without a basis."""
        return self.bases[site_key(site, self.bases)]

    def top_features(self, site: SiteLike, k: int = 10) -> list[tuple[int, float]]:
        """The `k` most important features at a site as (index, importance), most important
        first (`SiteBasis.importance_order`: the first columns of a sorted basis, a raw site's
        coordinates of largest variance)."""
        b = self[site]
        return [(i, float(b.importance[i])) for i in b.importance_order()[: max(0, k)].tolist()]

    def to(self, device: torch.device | str) -> BasisResult:
        """The same bases with their tensors on `device` (float64 throughout)."""
        return BasisResult({k: b.to(device) for k, b in self.bases.items()}, self.metadata)

    # -- the result protocol -------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        return {f"{name}/{f}": getattr(b, f) for name, b in self.bases.items() for f in _FIELDS}

    def _metadata(self) -> dict[str, Any]:
        entries = [
            {"name": name, "site": b.site.to_json(), "kind": b.kind}
            for name, b in self.bases.items()
        ]
        return {**self.metadata, "bases": entries}

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """Every entry of a saved basis names its site and a known kind, and its tensors are
        finite float64 of consistent shapes (`C` d×k, `C⁺` k×d, mean and Gram spectrum d,
        importance k): an edited metadata.json or a replaced tensor file with its checksum
        updated would otherwise load and fail, or silently act at another hook, when used."""
        meta_file = folder / METADATA_FILE
        kind = meta.get("kind")
        if kind is not None and kind not in BASIS_KINDS:
            raise ArtifactError(
                f"{meta_file}: kind {kind!r} is not a kind of basis ({', '.join(BASIS_KINDS)}); "
                "the file was edited or damaged: restore it or fit the basis again"
            )
        entries = meta.get("bases")
        if not isinstance(entries, list):
            raise ArtifactError(
                f"{meta_file} lists no bases (its 'bases' entry is "
                f"{'missing' if entries is None else type(entries).__name__}); restore it or fit "
                "the basis again"
            )
        names = set()
        for i, entry in enumerate(entries):
            name = _check_entry(entry, i, meta_file)
            if name in names:
                raise ArtifactError(f"{meta_file}: bases[{i}]: site {name!r} appears twice")
            names.add(name)
            _check_tensors(tensors, name, folder / TENSORS_FILE)
        extra = sorted(k for k in tensors if k.rsplit("/", 1)[0] not in names)
        if extra:
            raise ArtifactError(
                f"{folder / TENSORS_FILE} holds tensors of no listed site ({extra[:3]}): "
                f"{meta_file} and it do not belong together; restore them or fit the basis again"
            )

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> BasisResult:
        bases: dict[str, SiteBasis] = {}
        for entry in meta["bases"]:
            name = entry["name"]
            try:
                fields = {f: tensors[f"{name}/{f}"] for f in _FIELDS}
            except KeyError as e:
                raise ArtifactError(f"the saved basis lacks tensor {e} for site {name}") from e
            bases[name] = SiteBasis(Site.from_json(entry["site"]), entry["kind"], **fields)
        return cls(bases, {k: v for k, v in meta.items() if k != "bases"})

    # -- display ---------------------------------------------------------------------------------

    def summary_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "site": name,
                "kind": b.kind,
                "d": b.d,
                "kept": b.k,
                "top importance": [
                    round(float(b.importance[i]), 4) for i in b.importance_order()[:5].tolist()
                ],
            }
            for name, b in self.bases.items()
        ]

    def __repr__(self) -> str:
        model = self.metadata.get("model", {}).get("model_name")
        return (
            f"BasisResult(kind={self.kind!r}, model={model!r}, "
            f"sites={[r['site'] + ':' + str(r['kept']) for r in self.summary_rows()]})"
        )

    def _html_title(self) -> str:
        model = self.metadata.get("model", {}).get("model_name")
        return f"{self.kind.upper()} basis of {model}"

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.html import PageSection, table
        from tl_degeneracy.viz.plots import figure_to_html, plot_spectra

        spectra = plot_spectra(
            {n: b.importance.cpu().numpy() for n, b in self.bases.items() if b.kind != "raw"},
            title="importance per site",
        )
        info = (
            f"{self.metadata.get('n_tokens')} tokens; truncation "
            f"{self.metadata.get('truncation')}; TransformerLens "
            f"{self.metadata.get('versions', {}).get('transformer_lens')}"
        )
        return [
            PageSection(self._html_title(), table(self.summary_rows()), info),
            PageSection("Spectra", figure_to_html(spectra, "importance spectra")),
        ]


def _check_entry(entry: Any, i: int, meta_file: Path) -> str:
    """The site name of entry `i` of a saved basis's `bases`, checked against its site and
    kind."""
    where = f"{meta_file}: bases[{i}]"
    if not isinstance(entry, dict) or not {"name", "site", "kind"} <= set(entry):
        raise ArtifactError(
            f"{where} is {entry!r}, not an entry with a name, a site and a kind; the file was "
            "edited or damaged: restore it or fit the basis again"
        )
    name = entry["name"]
    try:
        site = Site.from_json(entry["site"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(
            f"{where} ({name!r}): its site {entry['site']!r} is invalid ({e})"
        ) from e
    if site.name != name:
        raise ArtifactError(
            f"{where}: the entry is named {name!r} but its site is {site.name!r} (hook "
            f"{site.hook!r}, positions {site.positions!r}), so the basis would act elsewhere than "
            "it was fitted; the file was edited: restore it or fit the basis again"
        )
    if entry["kind"] not in BASIS_KINDS:
        raise ArtifactError(
            f"{where} ({name!r}): kind {entry['kind']!r} is not a kind of basis "
            f"({', '.join(BASIS_KINDS)}); restore the file or fit the basis again"
        )
    return str(name)


def _check_tensors(tensors: dict[str, Tensor], name: str, tensor_file: Path) -> None:
    """The tensors of site `name`: present, float64, finite, of consistent shapes."""
    missing = [f for f in _FIELDS if f"{name}/{f}" not in tensors]
    if missing:
        raise ArtifactError(
            f"{tensor_file} lacks {', '.join(missing)} for site {name}; restore it or fit the "
            "basis again"
        )
    t = {f: tensors[f"{name}/{f}"] for f in _FIELDS}
    C = t["C"]
    if C.ndim != 2:
        raise ArtifactError(f"{tensor_file}: {name}/C has shape {list(C.shape)}, not d × k")
    d, k = C.shape
    expected = {
        "C_pinv": [k, d],
        "importance": [k],
        "mean": [d],
        "gram_eigenvalues": [d],
    }
    for f, shape in expected.items():
        if list(t[f].shape) != shape:
            raise ArtifactError(
                f"{tensor_file}: {name}/{f} has shape {list(t[f].shape)}, but {name}/C is "
                f"{d} × {k}, so it should be {shape}; the basis's tensors do not belong "
                "together: restore the file or fit the basis again"
            )
    if t["full_spectrum"].ndim != 1:
        raise ArtifactError(
            f"{tensor_file}: {name}/full_spectrum has shape {list(t['full_spectrum'].shape)}, "
            "not a vector"
        )
    for f, x in t.items():
        if f == "full_spectrum" and x.numel() == 0:
            continue  # the default empty spectrum of bases without one
        if x.dtype != torch.float64:
            raise ArtifactError(
                f"{tensor_file}: {name}/{f} is {x.dtype}, but bases are saved in float64; "
                "restore the file or fit the basis again"
            )
        if not bool(x.isfinite().all()):
            raise ArtifactError(
                f"{tensor_file}: {name}/{f} holds NaN or infinite values; restore the file or "
                "fit the basis again"
            )
    # C⁺C = I tested on a few fixed random vectors: O(d·k) per site where the product itself
    # is O(d·k²) (half of loading SmolLM2's 61 bases); a wrong C moves them by O(1)
    probes = torch.randn(k, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = t["C_pinv"] @ (C @ probes) - probes
    error = float(moved.abs().max() / probes.abs().max()) if k else 0.0
    if error > PINV_TOLERANCE:
        raise ArtifactError(
            f"{tensor_file}: {name}/C_pinv is not a left inverse of {name}/C (C⁺C moves test "
            f"vectors by {error:.2g} of their size; fitted bases agree within "
            f"{PINV_TOLERANCE:g}), so "
            "features would not reconstruct the activations: restore the file or fit the "
            "basis again"
        )

"""Fitted bases at a list of sites (`BasisResult`): per site `C`, `C⁺`, importances, mean and
Gram spectrum, with the metadata of the fit; saved and loaded through the result protocol
(`engine.artifacts`), so a basis refuses a model it was not fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_degeneracy.engine.artifacts import ArtifactError, Result
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.sites import Site

_FIELDS = ("C", "C_pinv", "importance", "mean", "gram_eigenvalues", "full_spectrum")


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

    def __getitem__(self, site: Site | str) -> SiteBasis:
        key = site.name if isinstance(site, Site) else site
        if key not in self.bases:
            raise KeyError(f"no basis at site {key!r}; sites: {list(self.bases)}")
        return self.bases[key]

    def top_features(self, site: Site | str, k: int = 10) -> list[tuple[int, float]]:
        """The `k` most important features at a site as (index, importance)."""
        imp = self[site].importance
        return [(i, float(imp[i])) for i in range(min(k, imp.numel()))]

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
                "top importance": [round(float(x), 4) for x in b.importance[:5]],
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

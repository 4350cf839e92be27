"""The result of a basis fit: per site `C`, `C⁺`, importances, mean, Gram spectrum, plus
metadata (model identity, versions, weight processing, sites, dtype, data size).

Saved as safetensors (tensors) + JSON (metadata and a checksum of the tensor file); loading
never unpickles anything and refuses a model the basis was not fitted on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.compat import model_identity, tl_version, weight_processing
from tl_degeneracy.engine.sites import Site
from tl_degeneracy.viz.html import HtmlReprMixin

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"


class ArtifactError(ValueError):
    """A saved result that is missing, corrupted, or does not fit the model it is used with."""


def package_version() -> str:
    try:
        return importlib.metadata.version("tl_degeneracy")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_metadata(model: nn.Module, sites: list[Site], **fields: Any) -> dict[str, Any]:
    """Everything needed to know what a result was computed from."""
    dtype = next(model.parameters()).dtype
    return {
        "format_version": FORMAT_VERSION,
        "model": model_identity(model),
        "weight_processing": weight_processing(model),
        "sites": [s.to_json() for s in sites],
        "model_dtype": str(dtype),
        "statistics_dtype": "torch.float64",
        "versions": {
            "tl_degeneracy": package_version(),
            "transformer_lens": tl_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        **{k: _jsonable(v) for k, v in fields.items()},
    }


@dataclass
class BasisResult(HtmlReprMixin):
    """Fitted bases keyed by site name, in forward order, with their metadata."""

    bases: dict[str, SiteBasis]
    metadata: dict[str, Any]

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

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `path/tensors.safetensors` and `path/metadata.json`; returns the folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        entries = []
        for name, b in self.bases.items():
            for field_name in (
                "C",
                "C_pinv",
                "importance",
                "mean",
                "gram_eigenvalues",
                "full_spectrum",
            ):
                tensors[f"{name}/{field_name}"] = (
                    getattr(b, field_name).detach().clone().contiguous()
                )
            entries.append({"name": name, "site": b.site.to_json(), "kind": b.kind})
        save_file(tensors, str(folder / TENSORS_FILE))
        digest = hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest()
        meta = {**self.metadata, "bases": entries, "tensors_sha256": digest}
        (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> BasisResult:
        """Load a saved result; with `model`, check that it is the model of the fit."""
        folder = Path(path)
        meta_path, tensor_path = folder / METADATA_FILE, folder / TENSORS_FILE
        if not meta_path.exists() or not tensor_path.exists():
            raise ArtifactError(
                f"{folder} is not a saved basis: expected {METADATA_FILE} and {TENSORS_FILE}"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            msg = f"{meta_path} is corrupted (invalid JSON: {e}); re-run the fit"
            raise ArtifactError(msg) from e
        digest = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
        if meta.get("tensors_sha256") not in (None, digest):
            raise ArtifactError(
                f"{tensor_path} is corrupted: its checksum does not match {METADATA_FILE}; "
                "re-run the fit or restore the file"
            )
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{tensor_path} is corrupted ({e}); re-run the fit") from e
        bases: dict[str, SiteBasis] = {}
        for entry in meta["bases"]:
            name = entry["name"]
            try:
                fields = {
                    f: tensors[f"{name}/{f}"]
                    for f in (
                        "C",
                        "C_pinv",
                        "importance",
                        "mean",
                        "gram_eigenvalues",
                        "full_spectrum",
                    )
                }
            except KeyError as e:
                raise ArtifactError(f"{tensor_path} lacks tensor {e} for site {name}") from e
            bases[name] = SiteBasis(Site.from_json(entry["site"]), entry["kind"], **fields)
        result = cls(bases, {k: v for k, v in meta.items() if k != "bases"})
        if model is not None:
            result.check_model(model)
        return result

    def check_model(self, model: nn.Module) -> None:
        """Raise `ArtifactError` naming the field in which `model` differs from the fit's."""
        saved = self.metadata.get("model", {})
        current = model_identity(model)
        for key, value in saved.items():
            if key == "api":
                continue
            if current.get(key) != value:
                raise ArtifactError(
                    f"this basis was fitted on a different model: {key} is {value!r} in the "
                    f"saved basis but {current.get(key)!r} on this model. Fit a basis for this "
                    "model, or load the model the basis was fitted on."
                )

    # -- display ---------------------------------------------------------------------------------

    def summary_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name, b in self.bases.items():
            rows.append(
                {
                    "site": name,
                    "kind": b.kind,
                    "d": b.d,
                    "kept": b.k,
                    "top importance": [round(float(x), 4) for x in b.importance[:5]],
                }
            )
        return rows

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
            {name: b.importance.numpy() for name, b in self.bases.items() if b.kind != "raw"},
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

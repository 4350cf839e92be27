"""One protocol for every result: save, load, refuse the wrong model, render.

Every result type (`BasisResult`, `GramStatistics`, `JacobianGram`, `InteractionGraph`,
`EdgeAblation`, `AblationCurve`, `AttributionComparison`, ...) subclasses `Result`:

- `save(path) -> Path` writes a folder: `tensors.safetensors` (float tensors, device-
  independent: always written from the CPU) and `metadata.json` (what the result was computed
  from, built by `build_metadata`, plus a checksum of the tensor file). Nothing is pickled.
- `load(path, model=None)` reads it back and, given a model, refuses one the result was not
  computed on (every weight is fingerprinted, so a changed block shows). A model in another
  dtype or on another device is accepted: results are float64 and move where they are used.
- `_repr_html_()` and `save_html(path)` render it (the views are imported only then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tl_degeneracy.engine.compat import model_dtype, tl_version
from tl_degeneracy.engine.identity import identity_and_fingerprint, weight_processing

FORMAT_VERSION = 2
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"

R = TypeVar("R", bound="Result")


class ArtifactError(ValueError):
    """A saved result that is missing, corrupted, or does not fit the model it is used with."""


def package_version() -> str:
    try:
        return importlib.metadata.version("tl_degeneracy")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def jsonable(value: Any) -> Any:
    """Plain JSON data from dataclasses, tuples, dtypes and other config values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_metadata(model: nn.Module, sites: Sequence[Any] = (), **fields: Any) -> dict[str, Any]:
    """Everything needed to know what a result was computed from: the model's identity and
    weight fingerprint, weight processing, sites, dtypes, versions, and `fields`."""
    identity, fingerprint = identity_and_fingerprint(model)
    return {
        "format_version": FORMAT_VERSION,
        "model": identity,
        "weight_fingerprint": fingerprint,
        "weight_processing": weight_processing(model),
        "sites": [s.to_json() if hasattr(s, "to_json") else s for s in sites],
        "model_dtype": str(model_dtype(model)),
        "statistics_dtype": "torch.float64",
        "versions": {
            "tl_degeneracy": package_version(),
            "transformer_lens": tl_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        **{k: jsonable(v) for k, v in fields.items()},
    }


def check_model(metadata: dict[str, Any], model: nn.Module, what: str = "result") -> None:
    """Raise `ArtifactError` naming how `model` differs from the one `metadata` describes.

    The configuration must match, and every weight tensor's fingerprint within rounding
    (1e-5 relative in the same dtype, 1e-2 across dtypes such as float32 → bfloat16)."""
    saved = metadata.get("model", {})
    current, here = identity_and_fingerprint(model)
    fix = f"Compute the {what} for this model, or load the model it was computed on."
    for key, value in saved.items():
        if key in ("api", "weight_digest"):
            continue
        if current.get(key) != value:
            raise ArtifactError(
                f"this {what} was computed on a different model: {key} is {value!r} in the "
                f"saved {what} but {current.get(key)!r} on this model. {fix}"
            )
    saved_fp = metadata.get("weight_fingerprint")
    if saved_fp is None:  # written before fingerprints: the digest is all there is
        if saved.get("weight_digest") not in (None, current.get("weight_digest")):
            raise ArtifactError(f"this {what} was computed on a model with other weights. {fix}")
        return
    same_dtype = metadata.get("model_dtype") == str(model_dtype(model))
    rtol = 1e-5 if same_dtype else 1e-2
    for name in sorted(set(saved_fp) | set(here)):
        if name not in saved_fp or name not in here:
            raise ArtifactError(
                f"this {what} was computed on a model with other weights: {name!r} is "
                f"{'missing in' if name not in here else 'new on'} this model. {fix}"
            )
        for a, b in zip(saved_fp[name], here[name]):
            if abs(a - b) > rtol * max(abs(a), abs(b)) + 1e-12:
                raise ArtifactError(
                    f"this {what} was computed on a model with other weights: {name} differs "
                    f"(mean |w|, rms: {saved_fp[name]} saved vs {here[name]} here). {fix}"
                )


def write_artifact(
    path: str | Path, kind: str, tensors: dict[str, Tensor], metadata: dict[str, Any]
) -> Path:
    """Write `path/tensors.safetensors` (CPU, contiguous) and `path/metadata.json`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(folder / TENSORS_FILE))
    digest = hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest()
    meta = {**jsonable(metadata), "artifact": kind, "tensors_sha256": digest}
    meta.setdefault("format_version", FORMAT_VERSION)
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1, allow_nan=False))
    return folder


def read_artifact(path: str | Path, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata of a saved result of `kind`, checked for corruption."""
    folder = Path(path)
    meta_path, tensor_path = folder / METADATA_FILE, folder / TENSORS_FILE
    if not meta_path.exists() or not tensor_path.exists():
        raise ArtifactError(
            f"{folder} is not a saved {kind}: expected {METADATA_FILE} and {TENSORS_FILE}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_path} is corrupted (invalid JSON: {e}); recompute it") from e
    found = meta.get("artifact", kind)
    if found != kind:
        raise ArtifactError(f"{folder} holds a saved {found}, not a {kind}")
    digest = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    if meta.get("tensors_sha256") not in (None, digest):
        raise ArtifactError(
            f"{tensor_path} is corrupted: its checksum does not match {METADATA_FILE}; "
            "recompute it or restore the file"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{tensor_path} is corrupted ({e}); recompute it") from e
    return tensors, meta


class Rendered:
    """Gives an object `_repr_html_` (Jupyter) and `save_html` from `_html_sections()`; the
    views are leaves, imported only when something is rendered."""

    def _html_sections(self) -> list[Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement _html_sections()")

    def _html_title(self) -> str:
        return type(self).__name__

    def _repr_html_(self) -> str:
        from tl_degeneracy.viz.html import render_fragment

        return render_fragment(self._html_sections())

    def save_html(self, path: str | Path, title: str | None = None) -> Path:
        """Write a self-contained page that opens offline in any browser."""
        from tl_degeneracy.viz.html import HtmlPage

        page = HtmlPage(title or self._html_title()).extend(self._html_sections())
        return page.save(path)


class Result(Rendered):
    """The result protocol: subclasses set `ARTIFACT` and define `_tensors`, `_metadata`,
    `_from_artifact` and `_html_sections`."""

    ARTIFACT: ClassVar[str] = "result"

    def _tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_artifact(cls: type[R], tensors: dict[str, Tensor], meta: dict[str, Any]) -> R:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the result to the folder `path` (created); returns the folder."""
        return write_artifact(path, self.ARTIFACT, self._tensors(), self._metadata())

    @classmethod
    def load(cls: type[R], path: str | Path, model: nn.Module | None = None) -> R:
        """Read a result saved with `save`; with `model`, check it is the model it was
        computed on (`ArtifactError` says how it differs)."""
        tensors, meta = read_artifact(path, cls.ARTIFACT)
        if model is not None:
            check_model(meta, model, cls.ARTIFACT)
        return cls._from_artifact(tensors, meta)

    def check_model(self, model: nn.Module) -> None:
        """Raise `ArtifactError` when `model` is not the one this result was computed on."""
        check_model(self._metadata(), model, self.ARTIFACT)

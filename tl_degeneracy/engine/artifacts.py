"""One protocol for every result: save, load, refuse the wrong model, render.

Every result type (`BasisResult`, `GramStatistics`, `JacobianGram`, `InteractionGraph`,
`EdgeAblation`, `AblationCurve`, `AttributionComparison`, ...) subclasses `Result`:

- `save(path) -> Path` writes a folder: `tensors.safetensors` (float tensors, device-
  independent: always written from the CPU) and `metadata.json` (what the result was computed
  from, built by `build_metadata`, plus a checksum of the tensor file). Nothing is pickled.
- `load(path, model=None)` reads it back, checks its format (and, per result type, its
  entries: `Result._check_artifact`, mostly one `check_saved` schema of the metadata keys and
  tensor shapes it needs; `metadata.json` is not under the tensors' checksum) and turns any
  other failure to rebuild it into an `ArtifactError` naming the folder's files. Given a
  model, it refuses one the result was not
  computed on (every weight is fingerprinted, so a rescaled, sign-flipped or permuted block
  shows). The same weights in another dtype, on another device or through the other
  TransformerLens API are accepted within the coarser dtype's rounding: results are float64
  and move where they are used.
- `_repr_html_()` and `save_html(path)` render it (the views are imported only then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tl_degeneracy.engine.brief_repr import BriefRepr
from tl_degeneracy.engine.compat import api_of, is_transformer, model_dtype, tl_version
from tl_degeneracy.engine.identity import (
    FINGERPRINT_FIELDS,
    comparable_fingerprint,
    fingerprint_difference,
    identity_and_fingerprint,
    rounding_tolerance,
    weight_processing,
)

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


NUMBER_OR_NAN: tuple[type, None] = (float, None)
"""A number of metadata.json that may be NaN, which `jsonable` writes as null."""


def saved_float(value: Any) -> float:
    """A number read back from metadata.json: null (a NaN or infinity `jsonable` wrote) as NaN."""
    return math.nan if value is None else float(value)


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
    """Raise `ArtifactError` naming how `model` differs from the one `metadata` describes;
    warn (`UserWarning`) where the metadata cannot tell (`compare_model`)."""
    problem, caveat = compare_model(metadata, model, what)
    if problem is not None:
        raise ArtifactError(problem)
    if caveat is not None:
        warnings.warn(caveat, UserWarning, stacklevel=3)


def compare_model(
    metadata: dict[str, Any], model: nn.Module, what: str = "result"
) -> tuple[str | None, str | None]:
    """How `model` differs from the one `metadata` describes, and what could not be checked:
    (problem or None, caveat or None).

    The configuration must match, and every weight tensor's fingerprint
    (`identity.FINGERPRINT_FIELDS`: scale, sign and order of its entries) within the rounding
    of the coarser of the two dtypes (`identity.rounding_tolerance`: 1e-9 relative between
    float64 copies, 2e-6 with float32, 1e-2 with bfloat16). Weights are compared under the
    names both TransformerLens APIs share; a weight only one side has is allowed when it is
    zero (an absent bias), and otherwise means another weight layout. A fingerprint saved by an
    earlier version (mean |w| and rms only) is completed by the weight digest. Metadata of
    `build_metadata` without the model's identity (an edited file) cannot be checked and the
    caveat says so; a result that never records a model (an `AblationCurve` of bases given
    as a mapping) has nothing to check."""
    fix = f"Compute the {what} for this model, or load the model it was computed on."
    saved = metadata.get("model")
    saved_fp = metadata.get("weight_fingerprint")
    if not isinstance(saved, dict) and not isinstance(saved_fp, dict):
        if not {"versions", "model_dtype"} & set(metadata):
            return None, None  # a result that records no model (e.g. from bases without one)
        return None, (  # written by `build_metadata`, then edited
            f"this {what} records no model ('model' and 'weight_fingerprint' are missing from "
            "its metadata), so it cannot be checked against this model: make sure it was "
            f"computed on this model, or compute it again (a new {what} records it)"
        )
    current, here = identity_and_fingerprint(model)
    caveats = []
    if isinstance(saved, dict):
        for key, value in saved.items():
            if key in ("api", "weight_digest", "model_name"):
                continue  # a name (a folder's, on load_local) says nothing the weights don't
            if current.get(key) != value:
                return (
                    f"this {what} was computed on a different model: {key} is {value!r} in the "
                    f"saved {what} but {current.get(key)!r} on this model. {fix}"
                ), None
    else:
        saved = {}
        caveats.append(
            f"this {what} records no model configuration ('model' is missing from its "
            "metadata): only its weights were checked against this model"
        )
    digest = saved.get("weight_digest")
    digest_differs = digest not in (None, current.get("weight_digest"))
    if not isinstance(saved_fp, dict):  # written before fingerprints: the digest is all there is
        if digest_differs:
            return f"this {what} was computed on a model with other weights. {fix}", None
        if digest is None:
            caveats.append(
                f"this {what} records no weight fingerprint or digest ('weight_fingerprint' is "
                "missing from its metadata), so this model's weights cannot be checked against "
                "the ones it was computed on; only the configuration was checked"
            )
        return None, "; ".join(caveats) or None
    problem = _compare_fingerprints(metadata, saved_fp, here, model, what, fix)
    if problem is not None:
        return problem, None
    earlier = any(len(v) < len(FINGERPRINT_FIELDS) for v in saved_fp.values())
    if earlier and (digest is None or digest_differs):
        why = (
            "it records no weight digest either"
            if digest is None
            else "its weight digest differs from this model's (as it also does for the same "
            "weights in another dtype, on another device or API)"
        )
        caveats.append(
            f"this {what} was saved by an earlier tl_degeneracy, whose weight fingerprint "
            "(mean |w| and rms per tensor) does not show sign flips or permutations of "
            f"weights, and {why}: this model may compute another function. Save the {what} "
            "again with this version to check it fully"
        )
    return None, "; ".join(caveats) or None


def _compare_fingerprints(
    metadata: dict[str, Any],
    saved_fp: dict[str, Any],
    here_fp: dict[str, list[float]],
    model: nn.Module,
    what: str,
    fix: str,
) -> str | None:
    saved, here = comparable_fingerprint(saved_fp), comparable_fingerprint(here_fp)
    for name, values in saved.items():
        if not (
            isinstance(values, list)
            and 2 <= len(values) <= len(FINGERPRINT_FIELDS)
            and all(isinstance(v, (int, float)) for v in values)
        ):
            return (
                f"the saved {what}'s metadata is damaged: its weight_fingerprint entry for "
                f"{name!r} is {values!r}, not a list of 2 to {len(FINGERPRINT_FIELDS)} numbers; "
                f"restore metadata.json or compute the {what} again"
            )
    old = any(len(v) < len(FINGERPRINT_FIELDS) for v in saved.values())
    rtol = rounding_tolerance(metadata.get("model_dtype"), model_dtype(model))
    rtol = max(rtol, 1e-5) if old else rtol  # earlier fingerprints: 6 significant digits
    for name in sorted(set(saved) | set(here)):
        a, b = saved.get(name), here.get(name)
        if a is None or b is None:
            if (a if a is not None else b)[0] == 0:  # type: ignore[index]
                continue  # a zero tensor (an unused bias) is as good as none
            return _layout_problem(metadata, model, name, a is not None, what)
        diff = fingerprint_difference(a, b, rtol)
        if diff is not None:
            field, x, y = diff
            saved_wp, here_wp = metadata.get("weight_processing"), weight_processing(model)
            processing = (
                f" The weight processing differs too ({saved_wp} there, {here_wp} here): load "
                f"the model with the processing used for the {what}."
                if saved_wp is not None and jsonable(saved_wp) != jsonable(here_wp)
                else ""
            )
            return (
                f"this {what} was computed on a model with other weights: {name} differs "
                f"({field} {x:.8g} saved vs {y:.8g} here, beyond the tolerance {rtol:.1g} of "
                f"its dtypes).{processing} {fix}"
            )
    return None


def _layout_problem(
    metadata: dict[str, Any], model: nn.Module, name: str, saved_only: bool, what: str
) -> str:
    """Why a non-zero weight on one side only means another weight layout, and what to do."""
    api_names = {"hooked": "HookedTransformer", "bridge": "TransformerBridge"}
    saved_api = (
        metadata.get("model", {}).get("api") if isinstance(metadata.get("model"), dict) else None
    )
    here_api = api_of(model) if is_transformer(model) else "module"
    saved_wp, here_wp = metadata.get("weight_processing"), weight_processing(model)
    where = f"only in the saved {what}" if saved_only else "only on this model"
    origin = (
        f"It was computed on a {api_names.get(str(saved_api), saved_api or 'model')}; this "
        f"model is a {api_names.get(here_api, here_api)}"
    )
    if saved_wp is not None and jsonable(saved_wp) != jsonable(here_wp):
        origin += f"; weight processing {saved_wp} there, {here_wp} here"
    return (
        f"this {what} was computed on a model whose weights are laid out differently: "
        f"{name!r} is {where}. {origin}. Another TransformerLens API (HookedTransformer or "
        "TransformerBridge) or other weight processing (fold_ln, centring, folded value "
        "biases) names and shapes the weights differently, so they cannot be compared; the "
        "weights themselves may be the same. Load the model the way it was loaded for the "
        f"{what} (same API, same processing), or compute the {what} for this model."
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
    if not isinstance(meta, dict):
        raise ArtifactError(
            f"{meta_path} is corrupted (a JSON {type(meta).__name__}, not an object); recompute it"
        )
    _check_format(meta, meta_path)
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


def _check_format(meta: dict[str, Any], meta_path: Path) -> None:
    """A format this version reads (1 to `FORMAT_VERSION`); a newer one asks for an upgrade."""
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(
            f"{meta_path}: format_version {version!r} is not a format of tl_degeneracy (whole "
            f"numbers from 1; this version writes {FORMAT_VERSION}); the file was edited or "
            "damaged: restore it or recompute the result"
        )
    if version > FORMAT_VERSION:
        by = (
            meta.get("versions", {}).get("tl_degeneracy")
            if isinstance(meta.get("versions"), dict)
            else None
        )
        raise ArtifactError(
            f"{meta_path} is in format {version}"
            + (f", written by tl_degeneracy {by}" if by else "")
            + f"; this tl_degeneracy ({package_version()}) reads formats up to "
            f"{FORMAT_VERSION}: upgrade it (pip install -U tl_degeneracy)"
        )


SITE_JSON: dict[str, Any] = {"hook": str, "positions": (str, list)}
"""The schema of a site as `Site.to_json` writes it (for `check_saved`)."""

Shapes = Mapping[str, tuple[int | str, ...]]


def check_saved(
    folder: Path | None,
    what: str,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    keys: Mapping[str, Any],
    shapes: Shapes | Callable[[dict[str, Any]], Shapes],
    finite: bool = False,
) -> None:
    """Raise `ArtifactError` naming the file, the entry and the fix unless `meta` has the
    `keys` and `tensors` are exactly those of `shapes`: the declarative check of a result
    type's `_check_artifact`, so that an edited file is refused at load, not when used.

    `keys` maps a metadata key (a trailing `?`: optional) to its JSON schema: `str`, `int`,
    `float` (any number), `bool`, `list`, `dict`, `None` (null), a tuple of alternatives, a
    one-item list `[schema]` (a list of such entries) or a dict of keys (an object; `"*"`:
    every value). `shapes` (or a function of the checked metadata giving it) maps each tensor
    to its sizes: an int, or a name that must be the same size wherever it appears. With
    `finite`, every floating tensor must be finite. `folder` None names the files alone
    (`rebuilding` adds the folder)."""
    where = Path() if folder is None else folder
    fix = f"the file was edited or damaged: restore it or compute the {_words(what)} again"
    problem = _json_problem(meta, dict(keys), "")
    if problem is not None:
        raise ArtifactError(f"{where / METADATA_FILE}: {problem}; {fix}")
    expected = shapes(meta) if callable(shapes) else shapes
    problem = _shape_problem(tensors, expected, finite)
    if problem is not None:
        raise ArtifactError(f"{where / TENSORS_FILE}: {problem}; {fix}")


_JSON_NAMES = {
    str: "a string",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def _describe(schema: Any) -> str:
    if isinstance(schema, tuple):
        return " or ".join(_describe(s) for s in schema)
    if schema is None:
        return "null"
    if isinstance(schema, list):
        return "a list"
    if isinstance(schema, dict):
        return "an object"
    return _JSON_NAMES.get(schema, str(schema))


def _json_problem(value: Any, schema: Any, where: str) -> str | None:
    """What is wrong with the JSON `value` at `where` against `schema` (see `check_saved`)."""
    if isinstance(schema, tuple):
        if any(_json_problem(value, s, where) is None for s in schema):
            return None
    elif isinstance(schema, list):
        if isinstance(value, list):
            problems = (_json_problem(v, schema[0], f"{where}[{i}]") for i, v in enumerate(value))
            return next((p for p in problems if p is not None), None)
    elif isinstance(schema, dict):
        if isinstance(value, dict):
            return _keys_problem(value, schema, where)
    elif schema is None:
        if value is None:
            return None
    elif schema in (int, float):
        if isinstance(value, (int, float) if schema is float else int) and not isinstance(
            value, bool
        ):
            return None
    elif isinstance(value, schema):
        return None
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{where or 'the file'!r} is {shown}, not {_describe(schema)}"


def _keys_problem(obj: dict[str, Any], schema: dict[str, Any], where: str) -> str | None:
    for key, sub in schema.items():
        if key == "*":
            for k, v in obj.items():
                problem = _json_problem(v, sub, f"{where}[{k!r}]")
                if problem is not None:
                    return problem
            continue
        name = key.removesuffix("?")
        path = f"{where}.{name}" if where else name
        if name not in obj:
            if key.endswith("?"):
                continue
            return f"{path!r} is missing"
        problem = _json_problem(obj[name], sub, path)
        if problem is not None:
            return problem
    return None


def _shape_problem(tensors: dict[str, Tensor], shapes: Shapes, finite: bool) -> str | None:
    """What is wrong with the tensors against `shapes` (see `check_saved`), or None."""
    sizes: dict[str, tuple[int, str]] = {}  # a named size: its value and the tensor it is from
    for name, dims in shapes.items():
        if name not in tensors:
            return f"tensor {name!r} is missing"
        shape = list(tensors[name].shape)
        want = [sizes[d][0] if isinstance(d, str) and d in sizes else d for d in dims]
        if len(shape) != len(dims):
            return f"tensor {name!r} has shape {shape}, but it should have {len(dims)} dimensions"
        if any(isinstance(w, int) and w != n for w, n in zip(want, shape)):
            should = [w if isinstance(w, int) else "any" for w in want]
            origins = sorted({sizes[d][1] for d in dims if isinstance(d, str) and d in sizes})
            by = f" (to fit {', '.join(map(repr, origins))})" if origins else ""
            return f"tensor {name!r} has shape {shape}, but it should be {should}{by}"
        for d, n in zip(dims, shape):
            if isinstance(d, str):
                sizes.setdefault(d, (n, name))
        t = tensors[name]
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"tensor {name!r} holds NaN or infinite values"
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        return (
            f"it holds tensors that {METADATA_FILE} does not describe ({extra[:3]}), so the two "
            "do not belong together"
        )
    return None


def _words(artifact: str) -> str:
    """A result's `ARTIFACT` name as words: "ablation curve"."""
    return artifact.replace("_", " ")


@contextmanager
def rebuilding(meta_path: Path, tensor_path: Path, what: str) -> Iterator[None]:
    """The backstop of loading a saved result (`Result.load`, `DegeneracyReport.load`): any
    error while it is checked or rebuilt from `meta_path` (JSON) and `tensor_path` becomes an
    `ArtifactError` that names the files and the fix (an `ArtifactError` naming a file alone
    gets its folder)."""
    what = _words(what)
    fix = f"restore the files or compute the {what} again"
    try:
        yield
    except ArtifactError as e:
        message = str(e)
        if str(meta_path) in message or str(tensor_path) in message:
            raise
        if message.startswith((meta_path.name, tensor_path.name)):  # a file named alone
            raise ArtifactError(os.path.join(meta_path.parent, message)) from e
        raise ArtifactError(f"{meta_path}: {message}") from e
    except KeyError as e:
        raise ArtifactError(
            f"{meta_path} (or {tensor_path.name} beside it) lacks the entry {e}, which a saved "
            f"{what} has: the files were edited or damaged; {fix}"
        ) from e
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise ArtifactError(
            f"{meta_path}: an entry of this saved {what} (or a tensor of {tensor_path.name}) "
            f"does not fit ({type(e).__name__}: {e}): the files were edited or damaged; {fix}"
        ) from e


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


class Result(BriefRepr, Rendered):
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

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """Raise `ArtifactError` naming the file, the entry and the problem when the saved
        tensors and metadata do not form a valid result (an edited or damaged file that the
        checksum does not catch). Subclasses check what they read, most with one `check_saved`
        schema; the default checks nothing (`load` still names the files of any failure)."""

    def save(self, path: str | Path) -> Path:
        """Write the result to the folder `path` (created); returns the folder."""
        return write_artifact(path, self.ARTIFACT, self._tensors(), self._metadata())

    @classmethod
    def load(cls: type[R], path: str | Path, model: nn.Module | None = None) -> R:
        """Read a result saved with `save`; with `model`, check it is the model it was
        computed on (`ArtifactError` says how it differs). Damaged or edited files are refused
        with an `ArtifactError` naming the file (`_check_artifact`, then `rebuilding`)."""
        tensors, meta = read_artifact(path, cls.ARTIFACT)
        folder = Path(path)
        files = folder / METADATA_FILE, folder / TENSORS_FILE
        with rebuilding(*files, cls.ARTIFACT):
            cls._check_artifact(tensors, meta, folder)
        if model is not None:
            check_model(meta, model, cls.ARTIFACT)
        with rebuilding(*files, cls.ARTIFACT):
            return cls._from_artifact(tensors, meta)

    def check_model(self, model: nn.Module) -> None:
        """Raise `ArtifactError` when `model` is not the one this result was computed on."""
        check_model(self._metadata(), model, self.ARTIFACT)

"""The report's views on disk: the parts of a report that a study's own artifacts do not hold
(examples, logit effects, attribution, the dominant-direction diagnostic), written beside them by
`save_report_views` and read back by `load_report_views` (see `experiments.study.
load_study_artifacts`, behind `tl-degeneracy report OUT_DIR`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tl_degeneracy.viz.feature_views import LogitEffects, TopkExamples
from tl_degeneracy.viz.report import StudyReportInputs

__all__ = ["ViewError", "expect", "load_report_views", "read_view", "save_report_views", "within"]

T = TypeVar("T")
VIEW_FIX = (
    "run the command that wrote this folder again to write the views again, or delete the file "
    "(the report then leaves that view out)"
)
"""The fix a damaged view file names."""
_PARSE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError)
"""What building a view from JSON of the wrong shape raises."""


class ViewError(ValueError):
    """An entry of a saved JSON file that is not what was written there: `problem`, at the
    entry `keys` (outermost first). `read_view` adds the file and the fix."""

    def __init__(self, problem: str, keys: Sequence[str | int] = ()) -> None:
        self.problem = problem
        self.keys = tuple(keys)
        where = "".join(f"[{json.dumps(k)}]" for k in self.keys)
        super().__init__(f"{where}: {problem}" if where else problem)


_KINDS: dict[type, str] = {
    dict: "an object",
    list: "a list",
    str: "a string",
    float: "a number",
    int: "an integer",
    bool: "true or false",
}
"""The JSON kinds `expect` checks, by the Python type that stands for each (`float`: any
number). `viz` reads files without the engine (docs/architecture.md), so this is its own small
cousin of `engine.artifacts.check_saved`."""


def expect(value: Any, kind: type, *keys: str | int) -> Any:
    """`value` if it is of the JSON `kind` (a key of `_KINDS`), else a `ViewError` at `keys`."""
    types = (int, float) if kind is float else kind
    if not isinstance(value, types) or (kind is not bool and isinstance(value, bool)):
        raise ViewError(f"is {_json_type(value)} ({value!r:.40}), expected {_KINDS[kind]}", keys)
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}
    return "null" if value is None else names.get(type(value), "a number")


@contextmanager
def within(*keys: str | int) -> Iterator[None]:
    """Errors raised inside, located at `keys` (prefixed to a `ViewError`'s own; any other
    error of parsing becomes one, with its message)."""
    try:
        yield
    except ViewError as error:
        raise ViewError(error.problem, (*keys, *error.keys)) from error
    except _PARSE_ERRORS as error:
        message = " ".join(str(error).split())
        raise ViewError(f"{type(error).__name__}: {message}", keys) from error


def read_view(path: str | Path, parse: Callable[[Any], T], fix: str = VIEW_FIX) -> T:
    """`parse` of the JSON in `path`, the one reader of a study's saved JSON files: a file that
    is not JSON, or whose entries `parse` cannot use, is refused as one `ValueError` naming
    the file, the entry and `fix`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # a JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}") from error
    try:
        with within():
            return parse(raw)
    except ViewError as error:
        raise ValueError(f"{path}: {error}; {fix}") from error


def _by_site(cls: Any, fields: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
    """A parser of `{site: cls.to_json()}` whose entries hold the lists `fields` and optional
    integer `feature_ids`."""

    def parse(raw: Any) -> dict[str, Any]:
        expect(raw, dict)
        out = {}
        for site, entry in raw.items():
            with within(site):
                expect(entry, dict)
                for key in fields:
                    if key not in entry:
                        raise ViewError("is missing", (key,))
                    expect(entry[key], list, key)
                for i, feature in enumerate(
                    expect(entry.get("feature_ids", []), list, "feature_ids")
                ):
                    expect(feature, int, "feature_ids", i)
                out[site] = cls.from_json(entry)
        return out

    return parse


_VIEW_PARSERS = {
    "examples": _by_site(
        TopkExamples, ("values", "seq_idx", "pos_idx", "tokens", "acts", "center")
    ),
    "logit_effects": _by_site(LogitEffects, ("promoted", "suppressed")),
}


def _diagnostic(raw: Any) -> Any:
    from tl_degeneracy.engine.diagnostics import DominantDirection, SinkDiagnostic

    expect(raw, dict)
    expect(raw.get("threshold"), float, "threshold")
    for site, share in expect(raw.get("shares"), dict, "shares").items():
        expect(share, float, "shares", site)
    expect(raw.get("n_tokens", 0), int, "n_tokens")
    for i, entry in enumerate(expect(raw.get("directions", []), list, "directions")):
        with within("directions", i):
            expect(entry, dict)
            DominantDirection.from_json(entry)
    return SinkDiagnostic.from_json(raw)


def _attribution(raw: Any) -> Any:
    from tl_degeneracy.engine.attribution import AttributionComparison, SiteAttribution

    expect(raw, dict)
    for name, entry in expect(raw.get("sites"), dict, "sites").items():
        with within("sites", name):
            SiteAttribution.from_json(expect(entry, dict))
    return AttributionComparison.from_json(raw)


def save_report_views(inputs: StudyReportInputs, out_dir: str | Path) -> Path:
    """Write the parts of `inputs` that `write_lm_fit` does not (examples, logit effects,
    attribution, diagnostic) as JSON into `out_dir`, where `load_study_artifacts` finds them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, by_kind in (("examples", inputs.examples), ("logit_effects", inputs.logit_effects)):
        for kind, by_site in by_kind.items():
            payload = {site: v.to_json() for site, v in by_site.items()}
            (out / f"{name}_{kind}.json").write_text(json.dumps(payload))
    for kind, comp in inputs.attribution.items():
        comp.save_json(out / f"attribution_{kind}.json")
    if inputs.diagnostic is not None:
        inputs.diagnostic.save(out / "diagnostic.json")
    return out


def load_report_views(out_dir: str | Path, kinds: Sequence[str]) -> dict[str, Any]:
    """What `save_report_views` wrote into `out_dir` (missing parts are empty): keyword
    arguments for `StudyReportInputs` (`examples`, `logit_effects`, `attribution`,
    `diagnostic`). A damaged file is refused by `read_view`, naming the file and the entry."""
    out = Path(out_dir)
    views: dict[str, Any] = {"examples": {}, "logit_effects": {}}
    for name, parse in _VIEW_PARSERS.items():
        for kind in kinds:
            path = out / f"{name}_{kind}.json"
            if path.exists():
                views[name][kind] = read_view(path, parse)
    views["attribution"] = {
        k: read_view(out / f"attribution_{k}.json", _attribution)
        for k in kinds
        if (out / f"attribution_{k}.json").exists()
    }
    diag_path = out / "diagnostic.json"
    views["diagnostic"] = read_view(diag_path, _diagnostic) if diag_path.exists() else None
    return views

"""Self-contained, offline HTML pages.

A page is a list of `PageSection`s, each made of `Fragment`s: trusted HTML plus the `Asset`s
(inline JavaScript or CSS bundles) it needs. `render_page` writes every asset once, in the order
first needed, so a page with five circuitsvis widgets holds the 1.3 MB circuitsvis bundle once.
Nothing is loaded from the network: no `src=`/`href=` points outside the document.

Escaping rules: text from data goes through `html.escape` (`text`, `table`, section titles),
data given to scripts through `json_for_script`, which escapes `<`, `>`, `&`, U+2028 and U+2029
so that a token string such as `</script>` cannot end the script element.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tl_degeneracy.engine.artifacts import Rendered

__all__ = [
    "Asset",
    "Fragment",
    "HtmlPage",
    "HtmlReprMixin",
    "PageSection",
    "json_for_script",
    "render_fragment",
    "render_page",
    "script_safe",
    "table",
    "text",
]

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JSON_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def json_for_script(obj: Any) -> str:
    """JSON text safe to place inside an inline `<script>` as a JavaScript expression.

    Non-finite floats come out as `NaN`/`Infinity`, which are valid JavaScript (not JSON).
    """
    dumped = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return _JSON_ESCAPE_RE.sub(lambda m: _JSON_ESCAPES[m.group()], dumped)


_SCRIPT_CLOSE_RE = re.compile(r"</(script)", re.IGNORECASE)
_STYLE_CLOSE_RE = re.compile(r"</(style)", re.IGNORECASE)
_SOURCE_MAP_RE = re.compile(r"^\s*//[#@]\s*sourceMappingURL=.*$", re.MULTILINE)


def script_safe(js: str) -> str:
    """Make third-party JavaScript safe to inline: no `</script`, no `<!--`, no source map.

    Both can only occur inside strings, regexes or comments of valid JavaScript, where
    `<\\/script` and `<\\x21--` mean the same thing (also in `/u` regexes).
    """
    js = _SOURCE_MAP_RE.sub("", js)
    js = _SCRIPT_CLOSE_RE.sub(r"<\\/\1", js)
    return js.replace("<!--", "<\\x21--")


@dataclass(frozen=True)
class Asset:
    """A JavaScript or CSS bundle inlined once per page; `key` identifies it for deduplication."""

    key: str
    source: str
    kind: Literal["js", "css"] = "js"

    def to_html(self) -> str:
        key = html.escape(self.key)
        if self.kind == "css":
            css = _STYLE_CLOSE_RE.sub(r"<\\/\1", self.source)
            return f'<style data-tld-asset="{key}">\n{css}\n</style>'
        return f'<script data-tld-asset="{key}">\n{script_safe(self.source)}\n</script>'


@dataclass(frozen=True)
class Fragment:
    """Trusted HTML and the assets it needs; build it only from escaped text or own markup."""

    html: str
    assets: tuple[Asset, ...] = ()

    def __add__(self, other: Fragment | str) -> Fragment:
        other = as_fragment(other)
        keys = {a.key for a in self.assets}
        extra = tuple(a for a in other.assets if a.key not in keys)
        return Fragment(self.html + other.html, self.assets + extra)

    def _repr_html_(self) -> str:
        return render_fragment([self])


def text(s: object, tag: str | None = None, cls: str | None = None) -> Fragment:
    """Escaped text, optionally wrapped in a tag (`text(label, "p")`)."""
    body = html.escape(str(s))
    if tag is None:
        return Fragment(body)
    if not re.fullmatch(r"[a-z][a-z0-9]*", tag):
        raise ValueError(f"bad tag {tag!r}")
    attr = f' class="{html.escape(cls)}"' if cls else ""
    return Fragment(f"<{tag}{attr}>{body}</{tag}>")


def _cell(value: object, float_fmt: str) -> str:
    if isinstance(value, float):
        return format(value, float_fmt)
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v, float_fmt) for v in value)
    return str(value)


def table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
    float_fmt: str = ".4g",
) -> Fragment:
    """An escaped HTML table from a list of dicts (columns default to the first row's keys)."""
    cols = list(columns) if columns is not None else list(rows[0]) if rows else []
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_cell(r.get(c, ''), float_fmt))}</td>" for c in cols)
        + "</tr>"
        for r in rows
    )
    return Fragment(
        f'<table class="tld-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def as_fragment(content: Fragment | str | Iterable[Fragment | str]) -> Fragment:
    """A `Fragment` from a fragment, trusted HTML string, or a sequence of those."""
    if isinstance(content, Fragment):
        return content
    if isinstance(content, str):
        return Fragment(content)
    out = Fragment("")
    for part in content:
        out = out + as_fragment(part)
    return out


@dataclass
class PageSection:
    """A titled part of a page. The title and description are escaped; `content` is trusted."""

    title: str
    content: Fragment | str | Sequence[Fragment | str] = ""
    description: str = ""

    def to_fragment(self, level: int = 2) -> Fragment:
        head = text(self.title, f"h{level}") if self.title else Fragment("")
        desc = text(self.description, "p", "tld-desc") if self.description else Fragment("")
        body = as_fragment(self.content)
        return (
            Fragment('<section class="tld-section">') + head + desc + body + Fragment("</section>")
        )


SectionLike = PageSection | Fragment | str | tuple[str, Any]


def _as_section(s: SectionLike) -> PageSection:
    if isinstance(s, PageSection):
        return s
    if isinstance(s, tuple):
        return PageSection(*s)
    return PageSection("", s)


def _collect_assets(fragments: Iterable[Fragment]) -> list[Asset]:
    seen: dict[str, Asset] = {}
    for frag in fragments:
        for asset in frag.assets:
            seen.setdefault(asset.key, asset)
    return list(seen.values())


BASE_CSS = """
.tld-page { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
  max-width: 1400px; padding: 0 1em; color: #222; }
.tld-page h1 { font-size: 1.6em; margin-bottom: 0.2em; }
.tld-section { margin: 1.5em 0 2em; }
.tld-section h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.tld-desc { color: #555; margin-top: 0.2em; }
.tld-table { border-collapse: collapse; font-size: 0.9em; }
.tld-table th, .tld-table td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top;
  text-align: left; }
.tld-table th { background: #f5f5f5; }
.tld-tok { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre;
  border-radius: 3px; padding: 0 3px; margin: 1px 2px; display: inline-block;
  max-width: 16em; overflow: hidden; text-overflow: ellipsis; vertical-align: bottom; }
.tld-tok-pos { background: #e3f0e3; }
.tld-tok-neg { background: #f6e0e0; }
.tld-val { color: #666; font-size: 0.85em; margin-left: 2px; }
.tld-figure img { max-width: 100%; height: auto; }
.tld-scroll { overflow-x: auto; max-width: 100%; }
"""
_BASE_ASSET = Asset("tld-base-css", BASE_CSS, "css")


def render_fragment(parts: Sequence[SectionLike]) -> str:
    """An HTML fragment (for Jupyter): assets inline first, then the sections; no network."""
    frags = [_as_section(p).to_fragment(level=3) for p in parts]
    assets = [_BASE_ASSET, *_collect_assets(frags)]
    body = "".join(f.html for f in frags)
    head = "\n".join(a.to_html() for a in assets)
    return f'{head}\n<div class="tld-page tld-fragment">{body}</div>'


def render_page(title: str, sections: Sequence[SectionLike], description: str = "") -> str:
    """A complete, self-contained HTML document; each asset appears once, in `<head>`."""
    frags = [_as_section(s).to_fragment() for s in sections]
    assets = [_BASE_ASSET, *_collect_assets(frags)]
    head_assets = "\n".join(a.to_html() for a in assets)
    desc = text(description, "p", "tld-desc").html if description else ""
    body = "\n".join(f.html for f in frags)
    t = html.escape(title)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{t}</title>\n{head_assets}\n</head>\n"
        f'<body>\n<main class="tld-page">\n<h1>{t}</h1>\n{desc}\n{body}\n'
        "</main>\n</body>\n</html>\n"
    )


@dataclass
class HtmlPage:
    """A page built section by section: `page.add("Graph", graph_widget_html(g)).save(path)`."""

    title: str
    description: str = ""
    sections: list[PageSection] = field(default_factory=list)

    def add(self, title: str, *content: Fragment | str, description: str = "") -> HtmlPage:
        self.sections.append(PageSection(title, list(content), description))
        return self

    def extend(self, sections: Iterable[SectionLike]) -> HtmlPage:
        self.sections.extend(_as_section(s) for s in sections)
        return self

    def to_html(self) -> str:
        return render_page(self.title, self.sections, self.description)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        return render_fragment(self.sections)


HtmlReprMixin = Rendered
"""`_repr_html_` (Jupyter) and `save_html` from `_html_sections()`: the engine's mixin, which
every result and report input shares."""

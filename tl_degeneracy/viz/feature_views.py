"""Feature views: tokens coloured by feature activations, top-k examples, logit effects.

Inputs are plain data (token strings, arrays), so these views do not depend on the core. The
circuitsvis widgets are emitted with circuitsvis's own inline bundle (`dist/cdn/iife.js`, the file
its `render_local` inlines), shared once per page as an `Asset`, and a per-widget
`CircuitsVis.render(id, CircuitsVis.<Component>, props)` call. We do not use circuitsvis's
`render()`: it inlines the bundle in every widget, its props JSON is not `</script>`-safe, and its
`RenderedHTML._repr_html_` probes the network.

circuitsvis 1.43 writes token strings with `dangerouslySetInnerHTML` (unescaped), so tokens are
HTML-escaped before they are handed to it; labels are React text and are passed as they are.
Every view shows a token as `visible_token` does (newlines ↵, tabs →, a blank token ␣); the
circuitsvis views cut a token longer than `CV_TOKEN_CHARS` characters with an ellipsis (the
package's own tables truncate it in CSS and keep the full text in the tooltip). A NaN or
infinite activation is never drawn as a value: circuitsvis colours it as 0, so its token is
marked `[NaN]` and a note above the view counts them; NaN logit effects are never ranked.
"""

from __future__ import annotations

import html
import importlib.metadata
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degeneracy.viz.html import Asset, Fragment, json_for_script

__all__ = [
    "LogitEffects",
    "TopkExamples",
    "circuitsvis_asset",
    "circuitsvis_widget",
    "feature_activations_view",
    "logit_effects_view",
    "top_logit_effects",
    "topk_examples",
    "topk_examples_view",
    "visible_token",
]

Acts = Float[Tensor, "pos n_features"] | Float[np.ndarray, "pos n_features"]

CV_TOKEN_CHARS = 40
"""Longest token (in characters) a circuitsvis view shows whole; longer ones end in `…`."""
MISSING_MARK = " [NaN]"
"""Appended to a token whose activation is NaN or infinite in a circuitsvis view."""


def visible_token(token: str) -> str:
    """A token as every view of the package shows it: newlines as ↵, tabs as →, and a token
    made only of spaces as one ␣ per space (so it is not an empty sliver); other text as it
    is (a leading space stays a space)."""
    t = str(token).replace("\n", "\u21b5").replace("\t", "\u2192")
    if t and not t.strip(" "):
        return "\u2423" * len(t)
    return t


@lru_cache(maxsize=1)
def circuitsvis_asset() -> Asset:
    """circuitsvis's inline browser bundle (defines the global `CircuitsVis`), read once."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    try:
        version = importlib.metadata.version("circuitsvis")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "unknown"
    return Asset(f"circuitsvis-{version}", path.read_text(encoding="utf-8"), "js")


def _plain(value: Any) -> Any:
    """Tensors and arrays to nested lists (non-finite values to 0) for JSON props."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            value = np.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
        return value.tolist()
    return value


def circuitsvis_widget(component: str, **props: Any) -> Fragment:
    """One circuitsvis React component, e.g. `circuitsvis_widget("ColoredTokens", tokens=...)`.

    Props use circuitsvis's camelCase names; `None` props are dropped. Token strings must
    already be HTML-escaped (see module docstring).
    """
    if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", component):
        raise ValueError(f"bad circuitsvis component name {component!r}")
    div_id = f"tld-cv-{uuid.uuid4().hex[:12]}"
    data = {k: _plain(v) for k, v in props.items() if v is not None}
    js_id, js_props = json_for_script(div_id), json_for_script(data)
    script = (
        f"(function(){{var id={js_id};"
        f"try{{CircuitsVis.render(id,CircuitsVis.{component},{js_props});}}"
        "catch(e){document.getElementById(id).textContent='circuitsvis failed: '+e;}})();"
    )
    body = (
        f'<div id="{div_id}" class="tld-cv" data-component="{component}" '
        f'style="margin: 10px 0;"></div>\n<script>{script}</script>\n'
    )
    return Fragment(body, (circuitsvis_asset(),))


def _cv_tokens(tokens: Sequence[str], missing: Sequence[bool] | None = None) -> list[str]:
    """Tokens for a circuitsvis view: visible (`visible_token`), cut to `CV_TOKEN_CHARS` with an
    ellipsis, marked where `missing`, then HTML-escaped (see the module docstring)."""
    out = []
    for i, tok in enumerate(tokens):
        t = visible_token(tok)
        if len(t) > CV_TOKEN_CHARS:
            t = t[: CV_TOKEN_CHARS - 1] + "\u2026"
        if missing is not None and missing[i]:
            t += MISSING_MARK
        out.append(html.escape(t, quote=False))
    return out


def _missing_note(n: int, noun: str) -> Fragment:
    """A line above a view that says how many of its values (`noun`s) are NaN or infinite."""
    if not n:
        return Fragment("")
    what = f"1 {noun} is" if n == 1 else f"{n} {noun}s are"
    return Fragment(
        f'<p class="tld-desc tld-missing">{what} NaN or infinite (missing): marked '
        f"{html.escape(MISSING_MARK.strip())} after the token and left uncoloured.</p>"
    )


def _to_numpy(x: Tensor | np.ndarray | Sequence[Sequence[Real]]) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_activations_view(
    str_tokens: Sequence[str],
    acts: Acts | Sequence[Sequence[Real]],
    feature_names: Sequence[str] | None = None,
    max_features: int = 32,
) -> Fragment:
    """Tokens of one sequence coloured by each of several features (circuitsvis
    `ColoredTokensMulti`: click a feature name to colour by it, hover a token for all values).

    With more than `max_features` columns, the ones with the largest peak |activation| are kept.
    """
    values = _to_numpy(acts)
    if values.ndim != 2 or values.shape[0] != len(str_tokens):
        raise ValueError(f"acts must be [pos={len(str_tokens)}, n_features], got {values.shape}")
    names = [str(n) for n in feature_names] if feature_names is not None else None
    if names is not None and len(names) != values.shape[1]:
        raise ValueError(f"{len(names)} feature names for {values.shape[1]} features")
    if names is None:
        names = [str(i) for i in range(values.shape[1])]
    if values.shape[1] > max_features:
        peak = np.where(np.isfinite(values), np.abs(values), -np.inf).max(axis=0, initial=-np.inf)
        keep = np.sort(np.argsort(-peak, kind="stable")[:max_features])
        values, names = values[:, keep], [names[i] for i in keep]
    bad = ~np.isfinite(values)  # [pos, n_features]
    names = [f"{n} (NaN at {int(c)})" if c else n for n, c in zip(names, bad.sum(axis=0).tolist())]
    widget = circuitsvis_widget(
        "ColoredTokensMulti",
        tokens=_cv_tokens(str_tokens, bad.any(axis=1).tolist()),
        values=values,
        labels=names,
    )
    return _missing_note(int(bad.sum()), "value") + widget


def _feature_ids(ids: Sequence[int], n_rows: int, owner: str) -> list[int]:
    """`ids` checked against `n_rows` rows (one distinct id per row); empty means 0..n-1."""
    out = [int(i) for i in ids] if len(ids) else list(range(n_rows))
    if len(out) != n_rows:
        raise ValueError(f"{owner}: {len(out)} feature ids for {n_rows} rows")
    if len(set(out)) != len(out):
        raise ValueError(f"{owner}: repeated feature ids {out}")
    return out


def _row_of(ids: list[int], feature: int) -> int | None:
    try:
        return ids.index(int(feature))
    except ValueError:
        return None


@dataclass
class TopkExamples:
    """The top-k activating contexts of some features of a site. Tensors and lists are indexed
    `[row][example]`; row `r` holds feature `feature_ids[r]` (a column of the site's basis), so
    look a feature up with `row_of(feature)`. Without ids, row `r` is feature `r`."""

    values: Float[Tensor, "n_features k"]
    seq_idx: Tensor
    pos_idx: Tensor
    tokens: list[list[list[str]]]
    acts: list[list[list[float]]]
    center: list[list[int]]
    feature_ids: list[int] = field(default_factory=list)
    """The feature each row holds, in row order (empty when given: `0, 1, …, n_features − 1`)."""

    def __post_init__(self) -> None:
        self.feature_ids = _feature_ids(self.feature_ids, self.n_features, "TopkExamples")

    @property
    def n_features(self) -> int:
        """The number of rows (features held)."""
        return self.values.shape[0]

    def row_of(self, feature: int) -> int | None:
        """The row that holds `feature`, or None when it has no examples here."""
        return _row_of(self.feature_ids, feature)

    def snippets(self, row: int, mark: tuple[str, str] = ("[[", "]]")) -> list[str]:
        """Plain-text contexts of one row's feature with the peak token marked."""
        out = []
        for toks, c in zip(self.tokens[row], self.center[row]):
            out.append("".join(toks[:c]) + mark[0] + toks[c] + mark[1] + "".join(toks[c + 1 :]))
        return out

    def graph_examples(self, row: int) -> list[dict[str, Any]]:
        """Examples of one row's feature in the graph widget's format (tokens, values, peak)."""
        return [
            {"tokens": toks, "values": [round(a, 4) for a in acts], "center": c}
            for toks, acts, c in zip(self.tokens[row], self.acts[row], self.center[row])
        ]

    def subset(self, rows: Sequence[int]) -> TopkExamples:
        """Some rows only, in the given order, with their feature ids."""
        idx = [int(i) for i in rows]
        return TopkExamples(
            self.values[idx],
            self.seq_idx[idx],
            self.pos_idx[idx],
            [self.tokens[i] for i in idx],
            [self.acts[i] for i in idx],
            [self.center[i] for i in idx],
            [self.feature_ids[i] for i in idx],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "values": self.values.tolist(),
            "seq_idx": self.seq_idx.tolist(),
            "pos_idx": self.pos_idx.tolist(),
            "tokens": self.tokens,
            "acts": self.acts,
            "center": self.center,
            "feature_ids": self.feature_ids,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TopkExamples:
        """From `to_json`'s dict; one written without `feature_ids` holds features 0..n-1."""
        return cls(
            torch.tensor(d["values"], dtype=torch.float32),
            torch.tensor(d["seq_idx"], dtype=torch.long),
            torch.tensor(d["pos_idx"], dtype=torch.long),
            d["tokens"],
            d["acts"],
            d["center"],
            d.get("feature_ids") or [],
        )


def topk_examples(
    features: Float[Tensor, "n_seq pos n_features"],
    str_tokens: Sequence[Sequence[str]] | Int[Tensor, "n_seq pos"],
    k: int = 5,
    context: tuple[int, int] = (8, 2),
    one_per_sequence: bool = True,
    absolute: bool = False,
    vocab: Sequence[str] | Callable[[int], str] | None = None,
    feature_ids: Sequence[int] | None = None,
) -> TopkExamples:
    """Top-k examples of every feature at once (one `torch.topk`), with `context` =
    (tokens before, tokens after) around the peak. `feature_ids` names the feature of each
    column of `features` (e.g. the columns of a basis they were taken from; default 0..n-1).

    `str_tokens` are the token strings of each sequence, or token ids with `vocab` (a list of
    strings, or a function id -> string) to name them. Positions past the end of a sequence's
    `str_tokens` (padding) are never chosen. With `one_per_sequence`, each sequence contributes
    at most one example per feature; `absolute` ranks by |activation|.
    """
    x = features.detach().float().cpu()
    n_seq, n_pos, n_feat = x.shape
    if isinstance(str_tokens, Tensor):
        if vocab is None:
            raise ValueError("token ids need a vocab (list of strings or id -> string)")
        name = vocab if callable(vocab) else vocab.__getitem__
        str_tokens = [[name(int(t)) for t in row] for row in str_tokens.tolist()]
    if len(str_tokens) != n_seq:
        raise ValueError(f"{len(str_tokens)} token lists for {n_seq} sequences")
    lengths = torch.tensor([min(len(t), n_pos) for t in str_tokens])
    valid_pos = torch.arange(n_pos)[None, :] < lengths[:, None]  # [n_seq, pos]
    score = x.abs() if absolute else x
    score = score.masked_fill(~valid_pos[:, :, None] | score.isnan(), float("-inf"))
    if one_per_sequence:
        best, best_pos = score.max(dim=1)  # [n_seq, n_feat]
        kk = min(k, int((lengths > 0).sum()))
        _, seq = best.topk(kk, dim=0)  # [kk, n_feat]
        pos = best_pos.gather(0, seq)
    else:
        kk = min(k, int(valid_pos.sum()))
        _, flat = score.reshape(n_seq * n_pos, n_feat).topk(kk, dim=0)
        seq, pos = flat // n_pos, flat % n_pos
    seq, pos = seq.T.contiguous(), pos.T.contiguous()  # [n_feat, kk]
    feat = torch.arange(n_feat)[:, None]
    values = x[seq, pos, feat]

    left, right = context
    win = pos[..., None] + torch.arange(-left, right + 1)  # [n_feat, kk, W]
    in_seq = (win >= 0) & (win < lengths[seq][..., None])
    win_acts = x[seq[..., None], win.clamp(0, n_pos - 1), feat[..., None]]

    seq_l, win_l, in_l, acts_l = seq.tolist(), win.tolist(), in_seq.tolist(), win_acts.tolist()
    tokens, acts, center = [], [], []
    for f in range(n_feat):
        f_toks, f_acts, f_center = [], [], []
        for e in range(kk):
            s, cols, ok = seq_l[f][e], win_l[f][e], in_l[f][e]
            f_toks.append([str(str_tokens[s][p]) for p, v in zip(cols, ok) if v])
            f_acts.append([a for a, v in zip(acts_l[f][e], ok) if v])
            f_center.append(sum(ok[:left]))
        tokens.append(f_toks)
        acts.append(f_acts)
        center.append(f_center)
    ids = list(feature_ids) if feature_ids is not None else []
    return TopkExamples(values, seq, pos, tokens, acts, center, ids)


def topk_examples_view(
    examples: TopkExamples,
    feature_names: Sequence[str] | None = None,
    site: str = "",
    features: Sequence[int] | None = None,
) -> Fragment:
    """The top-k contexts of each feature (circuitsvis `TopkSamples`: pick a feature, see its
    examples coloured by that feature). `features` selects some features (ids, looked up with
    `examples.row_of`; those without examples are left out), in the given order;
    `feature_names` has one name per row of `examples` (default: the feature ids)."""
    if features is None:
        idx = list(range(examples.n_features))
    else:
        found = (examples.row_of(f) for f in features)
        idx = [r for r in found if r is not None]
    if not idx or not examples.tokens[idx[0]]:
        return Fragment('<p class="tld-desc">No examples.</p>')
    names = [str(n) for n in feature_names] if feature_names is not None else None
    labels = [names[i] if names is not None else str(examples.feature_ids[i]) for i in idx]
    n_missing = 0
    tokens_shown: list[list[list[str]]] = []
    for i in idx:
        rows = []
        for toks, acts_row in zip(examples.tokens[i], examples.acts[i]):
            missing = [not np.isfinite(a) for a in acts_row]
            n_missing += sum(missing)
            rows.append(_cv_tokens(toks, missing))
        tokens_shown.append(rows)
    tokens = [tokens_shown]
    acts = [[examples.acts[i] for i in idx]]
    return _missing_note(n_missing, "activation") + circuitsvis_widget(
        "TopkSamples",
        tokens=tokens,
        activations=acts,
        zerothDimensionName="Site",
        firstDimensionName="Feature",
        zerothDimensionLabels=[site or "site"],
        firstDimensionLabels=labels,
    )


TokenValues = Sequence[tuple[str, float]]


def top_logit_effects(
    effects: Float[Tensor, "n_features d_vocab"],
    vocab: Sequence[str] | Callable[[int], str],
    k: int = 10,
) -> tuple[list[list[tuple[str, float]]], list[list[tuple[str, float]]]]:
    """The k most promoted and most suppressed tokens of each feature, from its direct effect
    on the logits (e.g. `direction @ W_U`); `vocab` is a list of token strings or a function
    id -> string (called only for the tokens shown)."""
    e = effects.detach().float().cpu()
    k = min(k, e.shape[1])
    nan = e.isnan()  # never ranked: left out of both lists
    top_v, top_i = e.masked_fill(nan, float("-inf")).topk(k, dim=1)
    bot_v, bot_i = e.masked_fill(nan, float("inf")).topk(k, dim=1, largest=False)
    name = vocab if callable(vocab) else vocab.__getitem__

    def pairs(v: Tensor, i: Tensor) -> list[list[tuple[str, float]]]:
        skip = nan.gather(1, i).tolist()
        return [
            [(name(t), val) for t, val, s in zip(ti, vi, si) if not s]
            for ti, vi, si in zip(i.tolist(), v.tolist(), skip)
        ]

    return pairs(top_v, top_i), pairs(bot_v, bot_i)


@dataclass
class LogitEffects:
    """The tokens some features of a site promote and suppress. Lists are indexed by row; row
    `r` holds feature `feature_ids[r]` (look a feature up with `row_of(feature)`). Without ids,
    row `r` is feature `r`."""

    promoted: list[list[tuple[str, float]]]
    suppressed: list[list[tuple[str, float]]]
    feature_ids: list[int] = field(default_factory=list)
    """The feature each row holds, in row order (empty when given: `0, 1, …, n_features − 1`)."""

    def __post_init__(self) -> None:
        if len(self.promoted) != len(self.suppressed):
            raise ValueError(
                f"LogitEffects: {len(self.promoted)} promoted rows, {len(self.suppressed)} "
                "suppressed"
            )
        self.feature_ids = _feature_ids(self.feature_ids, self.n_features, "LogitEffects")

    @classmethod
    def from_effects(
        cls,
        effects: Float[Tensor, "n_features d_vocab"],
        vocab: Sequence[str] | Callable[[int], str],
        k: int = 10,
        feature_ids: Sequence[int] | None = None,
    ) -> LogitEffects:
        """From each feature's effect on the logits (one row per feature; `feature_ids` names
        them, default 0..n-1)."""
        ids = list(feature_ids) if feature_ids is not None else []
        return cls(*top_logit_effects(effects, vocab, k), ids)

    @property
    def n_features(self) -> int:
        """The number of rows (features held)."""
        return len(self.promoted)

    def row_of(self, feature: int) -> int | None:
        """The row that holds `feature`, or None when it has no logit effects here."""
        return _row_of(self.feature_ids, feature)

    def to_json(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "suppressed": self.suppressed,
            "feature_ids": self.feature_ids,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LogitEffects:
        """From `to_json`'s dict; one written without `feature_ids` holds features 0..n-1."""

        def pairs(rows: Any) -> list[list[tuple[str, float]]]:
            return [[(str(t), float(v)) for t, v in row] for row in rows]

        return cls(pairs(d["promoted"]), pairs(d["suppressed"]), d.get("feature_ids") or [])


def _token_cells(items: TokenValues, cls: str) -> str:
    cells = []
    for tok, val in items:
        t = html.escape(visible_token(str(tok)))
        cells.append(
            f'<span class="tld-tok {cls}" title="{html.escape(repr(str(tok)))}">{t}</span>'
            f'<span class="tld-val">{float(val):+.3g}</span>'
        )
    return " ".join(cells)


def logit_effects_view(
    promoted: Sequence[TokenValues] | Mapping[str, TokenValues],
    suppressed: Sequence[TokenValues] | Mapping[str, TokenValues],
    feature_names: Sequence[str] | None = None,
) -> Fragment:
    """A table of the tokens each (late-site) feature promotes and suppresses. Plain HTML: every
    token and name is escaped and shown as `visible_token` does; a long token is cut with an
    ellipsis (CSS), its full text in the tooltip."""
    if isinstance(promoted, Mapping):
        names = [str(n) for n in promoted]
        promoted = list(promoted.values())
        suppressed = (
            [suppressed[n] for n in names] if isinstance(suppressed, Mapping) else suppressed
        )
    else:
        names = (
            [str(n) for n in feature_names]
            if feature_names
            else [str(i) for i in range(len(promoted))]
        )
        suppressed = list(suppressed.values()) if isinstance(suppressed, Mapping) else suppressed
    if not (len(names) == len(promoted) == len(suppressed)):
        raise ValueError("promoted, suppressed and feature_names must have the same length")
    rows = [
        f"<tr><td>{html.escape(n)}</td><td>{_token_cells(p, 'tld-tok-pos')}</td>"
        f"<td>{_token_cells(s, 'tld-tok-neg')}</td></tr>"
        for n, p, s in zip(names, promoted, suppressed)
    ]
    return Fragment(
        '<table class="tld-table tld-logit-effects">'
        "<thead><tr><th>feature</th><th>promoted</th><th>suppressed</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )

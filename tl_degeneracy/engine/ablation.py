"""Node ablation curves (docs/concepts.md, "Ablations"): keep the top k features at a site,
score the model.

A metric maps `(logits, tokens)` of a batch to one score per sequence (accuracy, negative
loss, ...; `per_sequence` checks it); scores are averaged over the sequences of the data.
`min_k` is the smallest k from which on the score stays within a tolerance of the unablated
score; a NaN score is never within it, and with a NaN unablated score (or a NaN score at the
largest k) nothing can be decided (`undecided`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from tl_degeneracy.engine.artifacts import NUMBER_OR_NAN, Result, check_saved, saved_float
from tl_degeneracy.engine.bases import SiteBasis
from tl_degeneracy.engine.basis_result import BasisResult
from tl_degeneracy.engine.capture import capture_sites, injection_hooks
from tl_degeneracy.engine.compat import run_with_hooks
from tl_degeneracy.engine.model_match import check_fits, warn_if_fitted_elsewhere
from tl_degeneracy.engine.sections import Section
from tl_degeneracy.engine.sites import LOGITS, Site, SiteLike, site_key
from tl_degeneracy.engine.streaming import iter_batches

Metric = Callable[
    [Float[Tensor, "batch pos vocab"], Int[Tensor, "batch pos"]], Float[Tensor, " batch"]
]


def per_sequence(
    scores: Tensor | float, batch: int, scalar_ok: bool = False
) -> Float[Tensor, " batch"] | Float[Tensor, ""]:
    """A metric's output as float64 values, one per sequence (`[batch]`), or with `scalar_ok`
    a scalar (attribution, which averages one batch, takes a batch mean as it is). The one
    check of what a metric returns: any other shape is refused, naming the shape expected,
    since a batch mean or per-token values averaged over the data weigh the batches wrongly."""
    value = scores if isinstance(scores, Tensor) else torch.as_tensor(scores, dtype=torch.float64)
    if tuple(value.shape) == (batch,) or (scalar_ok and value.ndim == 0):
        return value.to(torch.float64)
    expected = f"({batch},) or a scalar" if scalar_ok else f"({batch},)"
    hint = ""
    if value.ndim == 0:
        hint = (
            ": a scalar, such as the batch mean F.cross_entropy returns; return the value of "
            "each sequence instead (reduction='none', then .mean(-1) over its positions), as "
            "next_token_loss does"
        )
    elif value.ndim == 2 and tuple(value.shape) == (batch, 1):
        hint = ": one value per sequence in a column; drop the last axis (.squeeze(-1))"
    elif value.ndim >= 2 and value.shape[0] == batch:
        hint = ": a value per token; average over the positions of each sequence (.mean(-1))"
    raise ValueError(
        f"the metric must return one value per sequence {expected}, got shape "
        f"{tuple(value.shape)}{hint}"
    )


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy per sequence (lower is better)."""
    logp = F.log_softmax(logits[:, :-1].to(torch.float64), -1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    return nll.mean(-1)


def last_position_accuracy(label_fn: Callable[[Tensor], Tensor]) -> Metric:
    """Accuracy of the argmax at the last position against `label_fn(tokens)`.

    The metric is marked `last_position_only`: it reads nothing but `logits[:, -1]`, so the
    fast ablation paths may hand it the last position's logits alone (`[batch, 1, vocab]`).
    """

    def metric(logits: Tensor, tokens: Tensor) -> Tensor:
        return (logits[:, -1].argmax(-1) == label_fn(tokens)).to(torch.float64)

    metric.last_position_only = True  # type: ignore[attr-defined]
    return metric


def reads_last_position_only(metric: Metric) -> bool:
    """Whether `metric` promises to read only `logits[:, -1]` (see `last_position_accuracy`)."""
    return bool(getattr(metric, "last_position_only", False))


def ablation_schedule(k_max: int, dense_up_to: int = 10, growth: float = 1.05) -> list[int]:
    """Every k ≤ `dense_up_to`, then k ← ⌈growth·k⌉ up to `k_max` (included)."""
    ks = list(range(0, min(dense_up_to, k_max) + 1))
    k = ks[-1]
    while k < k_max:
        k = min(k_max, max(k + 1, math.ceil(growth * k)))
        ks.append(k)
    return ks


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, metric: Metric, batch_size: int = 1024) -> float:
    """Mean of `metric` over the sequences of the data."""
    total, n = 0.0, 0
    for batch in iter_batches(tokens, batch_size, model):
        total += float(per_sequence(metric(model(batch), batch), batch.shape[0]).sum())
        n += batch.shape[0]
    return total / n


@dataclass(repr=False)
class AblationCurve(Result):
    """Score against the number of kept features at one site."""

    site: str
    kind: str
    scores: dict[int, float]
    baseline: float
    higher_is_better: bool = True
    extra: dict = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    ARTIFACT = "ablation_curve"

    def min_k(self, tolerance: float) -> int | None:
        """Smallest k such that every evaluated k' ≥ k scores within `tolerance` of baseline.

        None when no evaluated k does, or when it cannot be decided (`undecided`: a NaN
        baseline). A NaN score is never within the tolerance: a curve whose scores at small k
        overflowed to NaN does not count as needing no features."""
        if math.isnan(self.baseline):
            return None
        best = None
        for k in sorted(self.scores, reverse=True):
            gap = self.baseline - self.scores[k]
            if not self.higher_is_better:
                gap = -gap
            if not gap <= tolerance:  # NaN: not within
                break
            best = k
        return best

    @property
    def undecided(self) -> bool:
        """Whether `min_k` cannot say how many features are needed: the unablated score is NaN,
        or the score with the most features kept is (so no k is known to pass), or there are
        no scores."""
        if not self.scores or math.isnan(self.baseline):
            return True
        return math.isnan(self.scores[max(self.scores)])

    @property
    def metric_label(self) -> str:
        """The metric's name as recorded (`metadata["metric"]`), else "metric", with its
        direction: "next_token_loss (lower is better)"."""
        name = str(self.metadata.get("metric") or "metric")
        return f"{name} ({'higher' if self.higher_is_better else 'lower'} is better)"

    def to_json(self) -> dict:
        return {
            "site": self.site,
            "kind": self.kind,
            "baseline": self.baseline,
            "higher_is_better": self.higher_is_better,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
        }

    @classmethod
    def from_json(cls, d: dict, metadata: dict | None = None) -> AblationCurve:
        scores = {int(k): float(v) for k, v in d["scores"].items()}
        return cls(
            d["site"],
            d["kind"],
            scores,
            d["baseline"],
            d.get("higher_is_better", True),
            metadata=metadata or {},
        )

    def _tensors(self) -> dict[str, Tensor]:
        ks = sorted(self.scores)
        return {
            "k": torch.tensor(ks, dtype=torch.int64),
            "score": torch.tensor([self.scores[k] for k in ks], dtype=torch.float64),
        }

    def _metadata(self) -> dict[str, Any]:
        return {**self.metadata, **self.to_json()}

    @classmethod
    def _check_artifact(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], folder: Path
    ) -> None:
        """What `from_json` and the page read, and the tensors `k` and `score`, one per score."""
        keys = {
            "site": str,
            "kind": str,
            "baseline": NUMBER_OR_NAN,
            "higher_is_better?": bool,
            "scores": {"*": NUMBER_OR_NAN},
        }

        def shapes(meta: dict[str, Any]) -> dict[str, tuple[int | str, ...]]:
            return {"k": (len(meta["scores"]),), "score": (len(meta["scores"]),)}

        check_saved(folder, cls.ARTIFACT, meta, tensors, keys, shapes)

    @classmethod
    def _from_artifact(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> AblationCurve:
        scores = {k: saved_float(v) for k, v in meta["scores"].items()}
        return cls.from_json(
            {**meta, "baseline": saved_float(meta["baseline"]), "scores": scores}, meta
        )

    def _html_sections(self) -> list:
        from tl_degeneracy.viz.html import PageSection, table
        from tl_degeneracy.viz.plots import figure_to_html, plot_ablation_curves

        baseline = self.baseline if math.isfinite(self.baseline) else None
        fig = plot_ablation_curves(
            {self.site: {self.kind.upper(): self.scores}}, self.metric_label, baseline
        )
        rows = [{"k": k, "score": v} for k, v in sorted(self.scores.items())]
        return [
            PageSection(
                f"{self.kind} node ablation at {self.site}",
                [figure_to_html(fig, "ablation curve"), table(rows)],
                f"{self.metric_label}: unablated score {self.baseline:.5f} (dashed line)",
            )
        ]


def node_ablation_curve(
    model: nn.Module,
    result: BasisResult | Mapping[str, SiteBasis],
    site: SiteLike,
    tokens: Int[Tensor, "n pos"],
    metric: Metric,
    ks: Sequence[int] | None = None,
    batch_size: int = 1024,
    higher_is_better: bool = True,
    progress: bool = True,
) -> AblationCurve:
    """Score the model with only the top k features kept at `site` (a name, `Site` or short
    form), for each k. `metric` returns one value per sequence (`per_sequence`); `progress`
    shows a bar over the batches (each batch scores every k).

    The site is captured once per batch. When the rest of the model from the site has a
    written-out structure (`structures.structure_of`: a site of the last block of a model
    without normalisation) and the metric reads only the last position, every k is scored
    from that capture, re-running only the last layer at the last position; otherwise the
    model runs once per k with the kept features written at the site.
    """
    from tl_degeneracy.engine.structures import PlainTailStructure, structure_of

    bases = result.bases if isinstance(result, BasisResult) else result
    name = site_key(site, bases)
    basis = bases[name]
    ks = list(ks) if ks is not None else ablation_schedule(basis.k)
    for k in ks:
        basis.check_kept(k)
    check_fits(model, [basis])
    warn_if_fitted_elsewhere(model, result)
    baseline = evaluate(model, tokens, metric, batch_size)
    meta = dict(result.metadata) if isinstance(result, BasisResult) else {}
    metric_name = getattr(metric, "__name__", "")
    if metric_name and metric_name not in ("<lambda>", "metric"):  # says which metric it is
        meta["metric"] = metric_name
    batches = iter_batches(tokens, batch_size, model)
    label = f"ablation {name} ({basis.kind}, {len(ks)} k)"
    bar = tqdm(batches, desc=label, unit="batch", disable=not progress, leave=False)
    if reads_last_position_only(metric):
        tail = structure_of(model, Section(basis.site.with_positions("all"), Site(LOGITS, "last")))
        if isinstance(tail, PlainTailStructure):
            scores = _plain_node_scores(model, tail.tail, basis, bar, metric, ks)
            return AblationCurve(
                name, basis.kind, scores, baseline, higher_is_better, metadata=meta
            )
    scores = _written_node_scores(model, basis, bar, metric, ks)
    return AblationCurve(name, basis.kind, scores, baseline, higher_is_better, metadata=meta)


@torch.no_grad()
def _written_node_scores(
    model: nn.Module,
    basis: SiteBasis,
    batches: Iterable[Tensor],
    metric: Metric,
    ks: Sequence[int],
) -> dict[int, float]:
    """Scores with `μ + f̂_{:k} C⁺_{:k}` written at the site, one forward per k and batch."""
    totals = dict.fromkeys(ks, 0.0)
    count = 0
    for batch in batches:
        (act,) = capture_sites(model, batch, [basis.site])
        b = basis.to(act.device)
        feats = b.features(act)
        for k in sorted(totals):
            kk = min(k, b.k)
            kept = b.mean + feats[..., :kk] @ b.C_pinv[:kk]
            logits = run_with_hooks(model, batch, injection_hooks(model, b.site, kept))
            totals[k] += float(per_sequence(metric(logits, batch), batch.shape[0]).sum())
        count += batch.shape[0]
    return {k: v / count for k, v in totals.items()}


@torch.no_grad()
def _plain_node_scores(
    model: nn.Module,
    tail: Any,
    basis: SiteBasis,
    batches: Iterable[Tensor],
    metric: Metric,
    ks: Sequence[int],
) -> dict[int, float]:
    """Node-ablation scores for every k from one capture of the site (float64).

    Keeping the top k features replaces the selected positions by `μ + f̂_{:k} C⁺_{:k}`;
    whatever the tail applies linearly first (the query/key/value projection at
    `resid_pre`, the MLP input at `resid_mid`, the unembedding at `resid_post`) is applied to
    `μ` and to the rows of `C⁺` once, so each k costs one small product and the rest of the
    last layer at the last position only.
    """
    site, stage, block = basis.site, tail.stage(basis.site.hook), tail.block
    totals = dict.fromkeys(ks, 0.0)
    count = 0
    full = Site(site.hook, "all")
    for batch in batches:
        (act,) = capture_sites(model, batch, [full])
        act = act.to(torch.float64)
        basis = basis.to(act.device)
        n_pos = batch.shape[1]
        idx = site.index(n_pos, act.device)
        last = n_pos - 1
        feats = basis.features(act[:, idx])  # [B, P, k]
        slot = (idx == last).nonzero()[:, 0]  # the last position's slot in the selection
        touches_last = len(slot) > 0
        f_last = feats[:, slot[0]] if touches_last else feats[:, :0]
        if stage == "pre":  # the first linear map: queries, keys and values of every position
            w, b = block.qkv_weight()
            clean_qkv = act @ w + b
            f_lin, proj = feats, basis.C_pinv @ w
            lin = (basis.mean @ w + b).expand(batch.shape[0], len(idx), -1)
        elif stage == "mid" and block.has_mlp:  # the MLP input at the last position
            assert block.W_in is not None and block.b_in is not None  # has_mlp: both are set
            f_lin, proj = f_last, basis.C_pinv @ block.W_in
            lin = (basis.mean @ block.W_in + block.b_in).expand(batch.shape[0], -1)
        else:  # the unembedding at the last position
            f_lin, proj = f_last, basis.C_pinv @ tail.W_U
            lin = (basis.mean @ tail.W_U + tail.b_U).expand(batch.shape[0], -1)
        x_last = basis.mean.expand(batch.shape[0], -1) if touches_last else act[:, last]
        done = 0
        for k in sorted(totals):  # each k once, also when `ks` repeats one
            kk = min(k, basis.k)
            if kk > done:  # add features done … kk-1 to the running sums
                lin = _add_features(lin, f_lin, proj, done, kk)
                if touches_last:
                    x_last = _add_features(x_last, f_last, basis.C_pinv, done, kk)
                done = kk
            if stage == "pre":
                qkv = lin if len(idx) == n_pos else clean_qkv.index_copy(1, idx, lin)
                mid = x_last + block.attend(qkv, [last])[:, 0]
                logits = tail.from_mid(mid)
            elif stage == "mid" and block.has_mlp and touches_last:
                logits = (x_last + block.mlp_from_pre(lin)) @ tail.W_U + tail.b_U
            elif stage == "mid":
                logits = tail.from_mid(x_last)
            else:
                logits = lin if touches_last else x_last @ tail.W_U + tail.b_U
            scores = per_sequence(metric(logits[:, None], batch), batch.shape[0])
            totals[k] += float(scores.sum())
        count += batch.shape[0]
    return {k: v / count for k, v in totals.items()}


def _add_features(
    acc: Float[Tensor, "... n"],
    feats: Float[Tensor, "... k"],
    rows: Float[Tensor, "k n"],
    lo: int,
    hi: int,
) -> Float[Tensor, "... n"]:
    """`acc + feats[..., lo:hi] @ rows[lo:hi]`; one feature as an outer product, which is
    several times faster than a matrix product with an inner dimension of one."""
    if hi - lo == 1:
        return torch.addcmul(acc, feats[..., lo : lo + 1], rows[lo])
    return acc + feats[..., lo:hi] @ rows[lo:hi]

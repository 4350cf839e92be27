"""Indirect-object identification (IOI) prompt pairs, and attribution patching on them.

A clean prompt names two people and repeats one of them, the *subject* S; the model should
complete with the other, the *indirect object* IO:

    "When Mary and John went to the store, John gave a drink to"  ->  " Mary"

The corrupted prompt swaps the second mention of the subject for the indirect object,

    "When Mary and John went to the store, Mary gave a drink to"  ->  " John",

so the right answer flips while every other token stays in place (all names, places and objects
are single tokens, so clean and corrupted prompts have the same length and their positions line
up). The metric is the logit difference `logit(IO) − logit(S)` at the last position: positive
when the model solves the clean task, negative on the corrupted one.

`ioi_attribution_demo` runs docs/attribution.md on these pairs: a LIB or PCA basis fitted at a few
residual-stream sites (last position) on other IOI prompts, per-feature attribution patching
against true feature patching and Λ.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_degeneracy.engine.bases import SiteBasis

__all__ = [
    "IOI_NAMES",
    "IOI_OBJECTS",
    "IOI_PLACES",
    "FINAL_SITE",
    "IOI_SITES",
    "IOI_TEMPLATES",
    "IOIPairs",
    "ioi_attribution_demo",
    "ioi_prompt_pairs",
    "single_token_words",
]

IOI_TEMPLATES = (
    "When {first} and {second} went to the {place}, {subject} gave a {object} to",
    "After {first} and {second} arrived at the {place}, {subject} handed a {object} to",
    "While {first} and {second} were working at the {place}, {subject} passed a {object} to",
)
"""Templates with two names, a place, the repeated subject and an object; the answer follows."""

IOI_NAMES = (
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Anna", "David", "Michael",
    "Emma", "Lisa", "Kate", "Paul", "Mark", "Peter", "Jack", "Laura", "Daniel", "Susan",
    "Robert", "Linda", "Chris", "Emily", "George", "Henry", "Grace", "Sam", "Rachel", "Adam",
)  # fmt: skip
IOI_PLACES = ("store", "park", "school", "office", "garden", "station", "market", "beach")
IOI_OBJECTS = ("drink", "book", "ball", "letter", "gift", "ring", "bag", "key")

IOI_SITES = (
    "blocks.12.hook_resid_post",
    "blocks.18.hook_resid_post",
    "blocks.24.hook_resid_post",
)
"""Residual-stream sites of SmolLM2 (30 blocks) used by the demonstration, at the last
position: the answer has to be assembled there, and the two prompts differ before it."""

FINAL_SITE = "blocks.29.hook_resid_post"
"""The final site of the demonstration's bases (raw coordinates): SmolLM2's last residual
stream, which the final norm and the unembedding read. Not the logits: a Gram over 49,152
logits would need 19 GB."""


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def single_token_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The words that are one token when preceded by a space (as they are mid-sentence), other
    than the tokenizer's unknown token (`unk_token_id`: a word-level vocabulary without the
    word encodes it so), and each token once (the first word that encodes to it), so two words
    kept are always two tokens."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    kept, seen = [], set()
    for w in words:
        ids = _encode(tokenizer, " " + w)
        if len(ids) == 1 and ids[0] != unknown and ids[0] not in seen:
            kept.append(w)
            seen.add(ids[0])
    return kept


@dataclass(frozen=True)
class IOIPairs:
    """Clean and corrupted IOI prompts as token rows of equal length, with their answers."""

    prompts: list[str]
    corrupted_prompts: list[str]
    clean_tokens: Int[Tensor, "n pos"]
    corrupted_tokens: Int[Tensor, "n pos"]
    io_tokens: Int[Tensor, " n"]
    """The indirect object's token (the clean prompt's answer)."""
    s_tokens: Int[Tensor, " n"]
    """The subject's token (the corrupted prompt's answer)."""

    def __len__(self) -> int:
        return len(self.prompts)

    def logit_difference(
        self, logits: Float[Tensor, "n pos vocab"], tokens: Int[Tensor, "n pos"] | None = None
    ) -> Float[Tensor, " n"]:
        """`logit(IO) − logit(S)` at the last position, one value per pair (float64). Usable
        as the metric of `compare_attribution` (`tokens` is accepted and ignored)."""
        last = logits[:, -1].to(torch.float64)
        io = last.gather(1, self.io_tokens[:, None].to(last.device))[:, 0]
        s = last.gather(1, self.s_tokens[:, None].to(last.device))[:, 0]
        return io - s


def ioi_prompt_pairs(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    template: str = IOI_TEMPLATES[0],
    names: Sequence[str] = IOI_NAMES,
    places: Sequence[str] = IOI_PLACES,
    objects: Sequence[str] = IOI_OBJECTS,
    prepend_bos: bool = True,
) -> IOIPairs:
    """`n` clean/corrupted IOI pairs from one template, drawn reproducibly from `seed`.

    Each pair picks two different names (IO and S, in random order in the first clause), a
    place and an object; the clean prompt repeats S, the corrupted one repeats IO instead.
    Words that are not single tokens for `tokenizer` (a Hugging Face tokenizer, or anything
    with `encode(text, add_special_tokens=False)` and `bos_token_id`) are left out, so every
    prompt of the template has the same length, and so are words it encodes as its unknown
    token or as a token an earlier word has (`single_token_words`), so IO and S always differ.
    """
    names = single_token_words(tokenizer, names)
    places = single_token_words(tokenizer, places)
    objects = single_token_words(tokenizer, objects)
    if len(names) < 2 or not places or not objects:
        raise ValueError(
            "need at least two single-token names, one place and one object for this tokenizer "
            f"(got {len(names)} names, {len(places)} places, {len(objects)} objects)"
        )
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    prompts, corrupted, corrupt_rows, io_ids, s_ids = [], [], [], [], []
    clean_rows: list[list[int]] = []
    for _ in range(n):
        io, s = rng.sample(names, 2)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        words = {"first": first, "second": second, "place": rng.choice(places)}
        words["object"] = rng.choice(objects)
        clean_text = template.format(subject=s, **words)
        corrupt_text = template.format(subject=io, **words)
        clean_row = bos + _encode(tokenizer, clean_text)
        corrupt_row = bos + _encode(tokenizer, corrupt_text)
        if len(clean_row) != len(corrupt_row) or (
            clean_rows and len(clean_row) != len(clean_rows[0])
        ):
            raise ValueError(f"prompts of unequal token length: {clean_text!r} / {corrupt_text!r}")
        prompts.append(clean_text)
        corrupted.append(corrupt_text)
        clean_rows.append(clean_row)
        corrupt_rows.append(corrupt_row)
        io_ids.append(_encode(tokenizer, " " + io)[0])
        s_ids.append(_encode(tokenizer, " " + s)[0])
    return IOIPairs(
        prompts,
        corrupted,
        torch.tensor(clean_rows, dtype=torch.long),
        torch.tensor(corrupt_rows, dtype=torch.long),
        torch.tensor(io_ids, dtype=torch.long),
        torch.tensor(s_ids, dtype=torch.long),
    )


def _top_features(basis: SiteBasis, k: int) -> SiteBasis:
    """The basis restricted to its `k` most important features (columns are sorted)."""
    return basis.truncated(k)


def ioi_report_attribution(
    model: nn.Module,
    results: dict[str, Any],
    tokenizer: Any = None,
    n_pairs: int = 8,
    n_features: int = 16,
    site: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Attribution patching against true patching for a study's bases on `n_pairs` indirect-
    object pairs, at one site (default: the middle `hook_resid_mid` site) over its `n_features`
    most important features: the report's attribution table. Empty when the tokenizer lacks
    single-token names (the pairs need them: names the tokenizer encodes as its unknown token
    do not count), or when IO and S are the same token in every pair. Returns
    `{kind: AttributionComparison}`."""
    from tl_degeneracy.engine.attribution import AttributionGapWarning, compare_attribution

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        return {}
    try:
        pairs = ioi_prompt_pairs(tokenizer, n_pairs, seed=seed)
    except (ValueError, KeyError, IndexError):
        return {}
    if bool((pairs.io_tokens == pairs.s_tokens).all()):  # the metric would be 0 on both
        return {}
    out: dict[str, Any] = {}
    for kind, result in results.items():
        names = [n for n in result.bases if "hook_resid_mid" in n] or list(result.bases)[:-1]
        name = site if site is not None else names[len(names) // 2]
        basis = _top_features(result[name], n_features)
        with warnings.catch_warnings():
            # the gap is this table's choice (its top features only), shown in the report
            warnings.simplefilter("ignore", AttributionGapWarning)
            comparison = compare_attribution(
                model,
                {name: basis},
                [name],
                pairs.clean_tokens,
                pairs.corrupted_tokens,
                pairs.logit_difference,
                metric_name="logit(IO) - logit(S) at the last position",
            )
        comparison.metadata.update(
            kind=kind,
            basis_kind=kind,
            n_features=n_features,
            example=(pairs.prompts[0], pairs.corrupted_prompts[0]),
        )
        out[kind] = comparison
    return out


def ioi_attribution_demo(
    model: nn.Module | None = None,
    n_pairs: int = 32,
    n_fit: int = 128,
    sites: Sequence[str] = IOI_SITES,
    final_site: str = FINAL_SITE,
    kinds: Sequence[Literal["lib", "pca"]] = ("lib", "pca"),
    n_features: int = 32,
    n_sources: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Attribution patching against true feature patching and Λ on IOI pairs (default model:
    SmolLM2-135M-Instruct).

    Bases are fitted at `sites` (last position) with `final_site` (last position, raw
    coordinates) as the final site, on `n_fit` other clean and corrupted prompts (seed
    `seed + 1`; stochastic `M'` with `n_sources` Rademacher sources, relative truncation
    1e-10). The comparison runs on `n_pairs` pairs (seed `seed`) over each site's `n_features`
    most important features (patching every feature of a 576-wide site would cost 576
    forwards per pair); the rest of the basis counts as truncation in the reported gap.
    `tokenizer` defaults to `model.tokenizer`. Returns `{kind: AttributionComparison}`.
    """
    from tl_degeneracy.engine.attribution import compare_attribution
    from tl_degeneracy.engine.bases import Truncation
    from tl_degeneracy.engine.fit import LIBConfig, fit_basis
    from tl_degeneracy.engine.jacobians import JacobianConfig
    from tl_degeneracy.engine.sites import Site
    from tl_degeneracy.engine.statistics import collect_statistics

    if model is None:
        from tl_degeneracy.models.smollm2.loader import load_smollm2

        model = load_smollm2()
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    pairs = ioi_prompt_pairs(tokenizer, n_pairs, seed=seed)
    fit = ioi_prompt_pairs(tokenizer, n_fit, seed=seed + 1)
    fit_tokens = torch.cat([fit.clean_tokens, fit.corrupted_tokens])
    site_list = (*(Site(h, "last") for h in sites), Site(final_site, "last"))
    start = time.perf_counter()
    stats = collect_statistics(model, site_list, fit_tokens, batch_size, progress=progress)
    stats_s = time.perf_counter() - start
    out: dict[str, Any] = {}
    for kind in kinds:
        start = time.perf_counter()
        config = LIBConfig(
            site_list,
            kind=kind,
            truncation=Truncation(1e-15, 1e-10),
            jacobian=JacobianConfig(method="stochastic", n_sources=n_sources, seed=seed),
            batch_size=batch_size,
            progress=progress,
        )
        result = fit_basis(model, fit_tokens, config, statistics=stats)
        fit_s = time.perf_counter() - start
        bases = {s.name: _top_features(result[s.name], n_features) for s in site_list[:-1]}
        comparison = compare_attribution(
            model,
            bases,
            list(bases),
            pairs.clean_tokens,
            pairs.corrupted_tokens,
            pairs.logit_difference,
            max_rows=batch_size,
            metric_name="logit(IO) - logit(S) at the last position",
        )
        comparison.metadata.update(
            kind=kind,
            basis_kind=kind,
            seed=seed,
            n_fit_prompts=2 * n_fit,
            n_features=n_features,
            kept_features={s.name: result[s.name].k for s in site_list[:-1]},
            statistics_seconds=stats_s,
            fit_seconds=fit_s,
            example=(pairs.prompts[0], pairs.corrupted_prompts[0]),
        )
        out[kind] = comparison
    return out

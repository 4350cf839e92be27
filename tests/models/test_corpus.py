"""The default Wikipedia corpus: cleaning, the split by article, packing and caching.

A byte-level tokenizer built from synthetic GGUF metadata stands in for the real one, so only
the `gensim` wheel (the corpus source) is needed; tests skip cleanly without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from tl_degeneracy.models import corpus
from tl_degeneracy.models.smollm2.gguf import tokenizer_from_gguf

MARKUP = """{{Infobox person|name=Ada {{nowrap|Lovelace}}|born=1815}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">{{cite|x}}</ref>
She wrote on the [[Analytical Engine]]<ref>Footnote</ref> &amp; more.<!-- hidden -->
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]] [in colour]]]
== Early life ==
* She was born in [http://example.org London].
{| class="wikitable"
| a || b
|}
[[Category:Mathematicians]] [[de:Ada Lovelace]]
== References ==
{{Reflist}} Lots of link lists.
"""


def byte_tokenizer():
    """A byte-level BPE with no merges: one token per byte, plus BOS/EOS specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<|endoftext|>", "<s>", "</s>", *sorted(ByteLevel.alphabet())]
    return tokenizer_from_gguf(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [],
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 256,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        }
    )


def require_gensim() -> None:
    if importlib.util.find_spec("gensim") is None:
        pytest.skip(f"gensim (the corpus source) is not installed ({corpus.GENSIM_PIP})")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_DEGENERACY_CACHE", str(tmp_path))
    return tmp_path


def test_cleaning_removes_markup_and_keeps_prose():
    text = corpus.clean_wikitext(MARKUP)
    assert text == (
        "Ada Lovelace was an English mathematician.\n"
        "She wrote on the Analytical Engine & more.\n\n"
        "Early life\n"
        "She was born in London."
    )


def test_split_is_deterministic_and_disjoint():
    titles = [f"article {i}" for i in range(50)]
    a = corpus.split_articles(titles, heldout_fraction=0.2, seed=3)
    assert a == corpus.split_articles(list(reversed(titles)), heldout_fraction=0.2, seed=3)
    assert a["train"].isdisjoint(a["heldout"]) and a["train"] | a["heldout"] == set(titles)
    assert len(a["heldout"]) == 10
    assert corpus.split_articles(titles, 0.2, seed=4)["heldout"] != a["heldout"]


def test_pack_cuts_rows_after_a_bos():
    rows = corpus.pack([[5, 6, 7], [8, 9, 10, 11]], seq_len=3, bos_token_id=1)
    assert rows.tolist() == [[1, 5, 6], [1, 7, 8], [1, 9, 10]]
    assert corpus.pack([[5, 6, 7], [8]], seq_len=2, bos_token_id=None).tolist() == [[5, 6], [7, 8]]


def test_tokens_from_text_files(tmp_path):
    tok = byte_tokenizer()
    paths = []
    for i, text in enumerate(["First document.", "Second, longer document text."]):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    rows = corpus.tokens_from_text_files(paths, tok, seq_len=8)
    assert rows.shape[1] == 8 and rows.dtype == torch.long
    assert (rows[:, 0] == tok.bos_token_id).all()
    joined = "".join(tok.decode(r[1:]) for r in rows)
    assert joined == "First document.\n\nSecond, longer document text.\n\n"[: len(joined)]


def test_a_text_file_that_is_not_utf8_is_named_with_a_conversion_that_works(tmp_path):
    """The suggested command names the source encoding (`iconv -t utf-8 FILE` alone fails
    under a UTF-8 locale) and writes the converted file, which then reads."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 3") as caught:
        corpus.tokens_from_text_files([path], byte_tokenizer())
    command = re.search(r"e\.g\. (iconv .*?) \(", str(caught.value))
    assert command is not None
    assert command[1] == f"iconv -f latin1 -t utf-8 {path} > {path}.utf8"
    if shutil.which("iconv") is not None:
        subprocess.run(command[1], shell=True, check=True, env={**os.environ, "LANG": "C.UTF-8"})
        assert (tmp_path / "latin1.txt.utf8").read_text(encoding="utf-8") == "café au lait"


def test_a_folder_given_as_a_text_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder: give text files \(e\.g\. .*\*\.txt\)"):
        corpus.tokens_from_text_files([tmp_path], byte_tokenizer())


def test_pack_refuses_rows_with_no_room_for_a_token():
    with pytest.raises(ValueError, match="seq_len 1 leaves no room for a token after BOS; use 2"):
        corpus.pack([[5, 6, 7]], seq_len=1, bos_token_id=1)
    with pytest.raises(ValueError, match="seq_len 0 leaves no room for a token; use 1"):
        corpus.pack([[5, 6, 7]], seq_len=0, bos_token_id=None)


def test_token_files_are_read_by_key_and_never_unpickled(tmp_path):
    """`tokens` (ours) or `input_ids` (Hugging Face's) in a safetensors file; another key, a
    pickle written by `torch.save` (not opened as one) or a missing file is named."""
    from safetensors.torch import save_file

    ids = torch.arange(12).reshape(3, 4)
    for key in corpus.TOKEN_KEYS:
        save_file({key: ids, "other": ids + 1}, str(tmp_path / f"{key}.safetensors"))
        assert torch.equal(corpus.tokens_from_file(tmp_path / f"{key}.safetensors"), ids)
    save_file({"x": ids}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"no 'tokens' tensor \(it has \['x'\]\)"):
        corpus.tokens_from_file(tmp_path / "x.safetensors")
    torch.save({"tokens": ids}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="pickled.pt is not a safetensors file"):
        corpus.tokens_from_file(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="no token file at"):
        corpus.tokens_from_file(tmp_path / "absent.safetensors")


@pytest.mark.parametrize(
    ("ids", "what"),
    [
        (torch.arange(320), r"'tokens' has shape \[320\]; token ids must be 2-D \[rows, pos\]"),
        (torch.zeros(20, 0, dtype=torch.long), r"'tokens' has shape \[20, 0\]; .*one position"),
        (torch.zeros(0, 16, dtype=torch.long), r"'tokens' has shape \[0, 16\]; .*one row"),
        (torch.zeros(1, 20, 16, dtype=torch.long), r"'tokens' has shape \[1, 20, 16\]; .*2-D"),
        (torch.zeros(2, 16), "'tokens' holds torch.float32 values; token ids are integers"),
    ],
)
def test_token_files_must_hold_integer_rows_and_positions(tmp_path, ids, what):
    """Not 2-D, no rows, no positions or not integers: the file, the key and the shape."""
    from safetensors.torch import save_file

    path = tmp_path / "tok.safetensors"
    save_file({"tokens": ids}, str(path))
    with pytest.raises(ValueError, match=f"tok.safetensors: {what}"):
        corpus.tokens_from_file(path)


def test_missing_gensim_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gensim" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim"):
        corpus.wiki_path()


def test_wikipedia_extract_cleans_fast_and_cleanly():
    require_gensim()
    start = time.perf_counter()
    articles = corpus.wiki_articles()
    seconds = time.perf_counter() - start
    assert seconds < 60, f"cleaning took {seconds:.1f} s"
    assert len(articles) > 100
    text = "\n".join(body for _, body in articles)
    assert len(text.split()) > 400_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</", "'''", "==", "&nbsp;", "http://"):
        assert markup not in text, markup


def test_corpus_is_deterministic_split_and_cached(tmp_cache):
    require_gensim()
    tok = byte_tokenizer()
    train = corpus.load_corpus(tok, seq_len=64, split="train")
    heldout = corpus.load_corpus(tok, seq_len=64, split="heldout")
    assert train.shape[1] == heldout.shape[1] == 64
    assert len(train) > 5 * len(heldout) > 0
    assert (train[:, 0] == tok.bos_token_id).all() and (heldout[:, 0] == tok.bos_token_id).all()
    assert len(list((tmp_cache / "corpus").glob("*.safetensors"))) == 1
    assert torch.equal(corpus.load_corpus(tok, seq_len=64, split="train"), train)  # from cache
    assert corpus.load_corpus(tok, seq_len=64, max_tokens=640).shape == (10, 64)
    # the held-out text comes from other articles
    train_text = tok.decode(train[:, 1:].flatten())
    for row in heldout[:: max(1, len(heldout) // 20)]:
        assert tok.decode(row[1:]) not in train_text
    with pytest.raises((ValueError, TypeError), match="split"):  # TypeError: runtime type checks
        corpus.load_corpus(tok, split="test")


def test_prompt_batches_group_prompts_by_length_without_padding():
    tok = byte_tokenizer()
    prompts = ["abc", "de", "fgh", "ij", "klm", "n"]
    batches = corpus.prompt_batches(prompts, tok, batch_size=2)
    bos = tok.bos_token_id
    rows = [[tok.decode(r[1:]) for r in b] for b in batches]
    assert rows == [["n"], ["de", "ij"], ["abc", "fgh"], ["klm"]]
    assert all(b.dtype == torch.long and (b[:, 0] == bos).all() for b in batches)
    bare = corpus.prompt_batches(["abc"], tok, prepend_bos=False)
    assert [tok.decode(r) for r in bare[0]] == ["abc"]
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        corpus.prompt_batches("abc", tok)
    with pytest.raises(ValueError, match="batch_size"):
        corpus.prompt_batches(prompts, tok, batch_size=0)


def test_statistics_over_prompt_batches_are_those_of_each_prompt_alone():
    """Fitting on `prompt_batches` sees exactly each prompt's own positions: the Gram equals
    the one of the prompts run one at a time; the padded batch's does not (its pad positions
    count as text)."""
    from tl_degeneracy import Site, collect_statistics
    from tl_degeneracy.models import tiny_model

    model = tiny_model("llama", "auto")
    prompts = ["hello there", "hi", "good morning", "ok", "yes"]
    sites = [Site("blocks.1.hook_resid_pre")]
    one_by_one = collect_statistics(model, sites, [model.to_tokens(p) for p in prompts], 1)
    batched = collect_statistics(model, sites, corpus.prompt_batches(prompts, model.tokenizer), 8)
    with pytest.warns(UserWarning, match="padded"):
        padded = collect_statistics(model, sites, model.to_tokens(prompts), 8)
    name = sites[0].name
    assert batched.count == one_by_one.count < padded.count
    torch.testing.assert_close(batched[name].gram, one_by_one[name].gram, rtol=1e-12, atol=0)
    assert not torch.allclose(padded[name].gram, one_by_one[name].gram, rtol=1e-3)

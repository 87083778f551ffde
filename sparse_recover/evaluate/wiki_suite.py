"""`wiki-suite`: a built-in, offline zero-shot task suite generated from held-out Wikipedia text.

Source: the held-out (`eval`) part of the built-in `wiki-en` text, `sparse_recover.data.wiki_en_part("eval")`
(about 1,050 lead sections of English Wikipedia articles; an article is held out when the first byte of
sha256(title) is below 26, so no article of this part is ever used for calibration or fine-tuning).
Everything below is a pure function of that list of extracts and the constants of this module, so the
items, and the bytes of the files, are the same on every machine.

Sentences. An extract is cut into sentences at `.`, `!` or `?` (optionally followed by a closing quote or
bracket) + whitespace + an upper-case letter, digit or opening quote; a cut is undone when the word before
it is a common abbreviation (`e.g.`, `St.`, `U.S.`, ...) or an initial (`J.`). Sentence spans are offsets
into the original extract, so contexts are exact prefixes of the extract.

`wiki_lambada`: last-word prediction, LAMBADA-style (as `lambada_openai` in lm-eval).
  For every extract, each sentence after the first that ends with a plain alphabetic word of at least 4
  letters followed by its final `.`, preceded by a single space, is a candidate. It is kept when the
  context (the extract up to, not including, that space) has at least 25 words and the word already occurs
  in the context (case-insensitive, whole word; LAMBADA's passages are selected so that the context makes
  the word predictable, and this is the cheap offline analogue). The last kept candidate of the extract
  (the longest context) gives the item: `context` = extract prefix, `target` = the word; at most one item
  per article. lm-eval scores it with `output_type: loglikelihood`, continuation `" " + target`:
  `acc` = 1 when the target is the greedy continuation (every target token is the argmax, lm-eval's
  `is_greedy`), `perplexity` = exp(-mean log p(target | context)). Chance accuracy is about 0.

`wiki_continuation`: choose the true continuation, HellaSwag-style, 4 candidates.
  For every extract with at least two sentences: `context` = the first sentence, or the first two when
  the first has fewer than 12 words (at most 3 sentences); the gold ending is the sentence that follows,
  kept when it has 6 to 50 words. The pool of endings is the gold endings of all extracts. Each item gets
  3 distractors drawn (random.Random(SEED + 1), items in source order) from the endings of OTHER
  articles whose word count is within [0.75x, 1.33x] of the gold's (the window widens to [0.5x, 2x], then
  to any length, only when fewer than 3 such exist), all 4 texts distinct. The 4 choices are shuffled with
  the same generator; `label` is the gold's index. lm-eval scores it with `output_type: multiple_choice`
  (continuations `" " + choice` after the context): `acc` (raw log-likelihood argmax) and `acc_norm`
  (per-byte normalised). Length-matched distractors keep `acc` from rewarding short endings. Chance 0.25.

`wiki_ppl` (optional, not part of `wiki-suite`): rolling log-likelihood of whole held-out extracts
  (`output_type: loglikelihood_rolling`; word_perplexity, byte_perplexity, bits_per_byte). The reference
  window perplexity of the same text is the `ppl` task with `--ppl-data wiki-en`.

Order and size. The items of each task are shuffled with random.Random(SEED) (SEED + 2 for wiki_ppl)
and the first MAX_ITEMS kept, so lm-eval's `limit=N` (which takes the first N documents) evaluates a
uniform, fixed sample of articles. Sizes with the current data: wiki_lambada ~380, wiki_continuation 500,
wiki_ppl 300.

Files. `wiki_suite_tasks()` writes, once, into `<cache>/wiki-suite/v<SUITE_VERSION>-<hash12>/` (cache =
`sparse_recover.models.cache_dir()`, i.e. $SPARSE_RECOVER_CACHE or ~/.cache/sparse-recover; hash12 = the
first 12 hex digits of sha256 over the suite version, the seed and the source extracts):
  `<task>-v<SUITE_VERSION>.jsonl`  one item per line (json, sorted keys, UTF-8)
  `<task>.yaml`                    the lm-eval task config (`dataset_path: json`, ABSOLUTE `data_files`)
The folder is written under a temporary name and renamed, so concurrent processes never see half a suite.
Bump SUITE_VERSION whenever the construction changes: the version names the folder, the files and the
lm-eval task versions, so results of different constructions are never mixed up.
Point lm-eval at it with `TaskManager(include_path=[folder])` (or the lm_eval CLI's `--include_path`);
the task configs also carry the tag `wiki-suite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

SUITE_VERSION = 1
SEED = 1234
MAX_ITEMS = 500
PPL_ITEMS = 300
GROUP = "wiki-suite"
TASKS = ("wiki_lambada", "wiki_continuation")
OPTIONAL_TASKS = ("wiki_ppl",)
ALL_TASKS = TASKS + OPTIONAL_TASKS

LAMBADA_MIN_CONTEXT_WORDS = 25
LAMBADA_MIN_LETTERS = 4
CONT_MIN_CONTEXT_WORDS = 12
CONT_MAX_CONTEXT_SENTENCES = 3
CONT_MIN_ENDING_WORDS = 6
CONT_MAX_ENDING_WORDS = 50
N_CHOICES = 4

_ABBREVIATIONS = frozenset(
    "e.g. i.e. etc. vs. c. ca. cf. al. approx. St. Mr. Mrs. Ms. Dr. Prof. Rev. Gen. Lt. Col. Capt. Sgt. Jr. "
    "Sr. No. Nos. Co. Corp. Inc. Ltd. Mt. Ft. U.S. U.K. U.N. Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. "
    "Sept. Oct. Nov. Dec. fl. b. d. r. ed. vol. Vol. p. pp. Op. op. Ph.D. Ave. Blvd.".split()
)
_BOUNDARY = re.compile(r"(?<=[.!?])[\"”’)\]]?\s+(?=[\"“(]?[A-Z0-9])")
_FINAL_WORD = re.compile(r"(?<= )([A-Za-z]+)\.$")


# --------------------------------------------------------------------------------------------------
# item construction (pure functions of the extracts)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of `text` (end excludes the whitespace after the sentence)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        # the closing quote/bracket, if any, belongs to the sentence
        end = m.start() + len(m.group(0)) - len(m.group(0).lstrip("\"”’)]"))
        words = text[start:end].split()
        last = words[-1] if words else ""
        if last in _ABBREVIATIONS or re.fullmatch(r"(?:[A-Z]\.)+", last):
            continue
        spans.append((start, end))
        start = m.end()
    tail = text[start:].rstrip()
    if tail:
        spans.append((start, start + len(tail)))
    return spans


def _words(s: str) -> int:
    return len(s.split())


def _lambada_item(text: str) -> tuple[str, str] | None:
    spans = sentence_spans(text)
    best = None
    for start, end in spans[1:]:
        m = _FINAL_WORD.search(text, start, end)
        if m is None or m.end() != end or len(m.group(1)) < LAMBADA_MIN_LETTERS:
            continue
        word_start = m.start(1)
        if text[word_start - 1] != " ":
            continue
        context = text[: word_start - 1]
        word = m.group(1)
        if _words(context) < LAMBADA_MIN_CONTEXT_WORDS:
            continue
        if re.search(r"\b" + re.escape(word) + r"\b", context, flags=re.IGNORECASE) is None:
            continue
        best = (context, word)
    return best


def _continuation_parts(text: str) -> tuple[str, str] | None:
    spans = sentence_spans(text)
    k = 1
    while k < len(spans) and k < CONT_MAX_CONTEXT_SENTENCES and _words(text[: spans[k - 1][1]]) < CONT_MIN_CONTEXT_WORDS:
        k += 1
    if k >= len(spans) or _words(text[: spans[k - 1][1]]) < CONT_MIN_CONTEXT_WORDS:
        return None
    context = text[: spans[k - 1][1]]
    ending = " ".join(text[spans[k][0] : spans[k][1]].split())
    if not CONT_MIN_ENDING_WORDS <= _words(ending) <= CONT_MAX_ENDING_WORDS:
        return None
    return context, ending


def _pick_distractors(rng: random.Random, gold: str, source: int, pool: list[tuple[int, str]]) -> list[str]:
    n_gold = _words(gold)
    for lo, hi in ((0.75, 1.34), (0.5, 2.0), (0.0, float("inf"))):
        cands = sorted({e for s, e in pool if s != source and e != gold and lo * n_gold <= _words(e) <= hi * n_gold})
        if len(cands) >= N_CHOICES - 1:
            return rng.sample(cands, N_CHOICES - 1)
    raise ValueError("not enough distinct endings from other articles to build 4 choices")


def build_items(extracts: list[str] | None = None, *, seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """task name -> items (dicts), in the final (shuffled, capped) order. `source` = index into `extracts`
    (by default `wiki_en_part("eval")`)."""
    if extracts is None:
        from sparse_recover.data import wiki_en_part

        extracts = wiki_en_part("eval")

    lambada = []
    for i, text in enumerate(extracts):
        got = _lambada_item(text)
        if got is not None:
            lambada.append({"source": i, "context": got[0], "target": got[1]})
    random.Random(seed).shuffle(lambada)
    lambada = lambada[:MAX_ITEMS]

    parts = []
    for i, text in enumerate(extracts):
        got = _continuation_parts(text)
        if got is not None:
            parts.append((i, got[0], got[1]))
    pool = [(i, ending) for i, _, ending in parts]
    rng = random.Random(seed + 1)
    continuation = []
    for i, context, gold in parts:
        choices = [gold] + _pick_distractors(rng, gold, i, pool)
        rng.shuffle(choices)
        continuation.append({"source": i, "context": context, "choices": choices, "label": choices.index(gold)})
    random.Random(seed).shuffle(continuation)
    continuation = continuation[:MAX_ITEMS]

    ppl = [{"source": i, "text": text} for i, text in enumerate(extracts)]
    random.Random(seed + 2).shuffle(ppl)
    ppl = ppl[:PPL_ITEMS]

    for name, items in (("wiki_lambada", lambada), ("wiki_continuation", continuation), ("wiki_ppl", ppl)):
        for n, item in enumerate(items):
            item["id"] = f"{name}-{n:04d}"
    return {"wiki_lambada": lambada, "wiki_continuation": continuation, "wiki_ppl": ppl}


# --------------------------------------------------------------------------------------------------
# lm-eval task configs


def task_configs(data_files: dict[str, str]) -> dict[str, dict[str, Any]]:
    """lm-eval task configs (plain dicts) reading the given ABSOLUTE JSONL paths (task name -> path)."""

    def base(name: str) -> dict[str, Any]:
        return {
            "task": name,
            "tag": [GROUP] if name in TASKS else ["wiki-suite-optional"],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data_files[name])}},
            "test_split": "test",
            "metadata": {"version": float(SUITE_VERSION)},
        }

    return {
        "wiki_lambada": {
            **base("wiki_lambada"),
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{' ' + target}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
        },
        "wiki_continuation": {
            **base("wiki_continuation"),
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "{{choices}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        "wiki_ppl": {
            **base("wiki_ppl"),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
        },
    }


def _jsonl_bytes(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n" for it in items).encode("utf-8")


def write_suite(folder: str | Path, extracts: list[str] | None = None) -> dict[str, Path]:
    """Write the JSONL items and task YAMLs of every task into `folder` (created). Returns task -> JSONL path."""
    import yaml

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    items = build_items(extracts)
    paths = {}
    for name in ALL_TASKS:
        path = folder / f"{name}-v{SUITE_VERSION}.jsonl"
        path.write_bytes(_jsonl_bytes(items[name]))
        paths[name] = path
    for name, cfg in task_configs({k: str(v) for k, v in paths.items()}).items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return paths


def source_hash(extracts: list[str]) -> str:
    h = hashlib.sha256(f"wiki-suite v{SUITE_VERSION} seed {SEED} max {MAX_ITEMS}/{PPL_ITEMS}\n".encode())
    for text in extracts:
        h.update(text.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def suite_folder(cache_root: str | Path | None = None) -> Path:
    """Where the suite for the installed data lives: <cache>/wiki-suite/v<SUITE_VERSION>-<hash12>."""
    from sparse_recover.data import wiki_en_part

    root = Path(cache_root) if cache_root is not None else _default_root()
    return root / f"v{SUITE_VERSION}-{source_hash(wiki_en_part('eval'))[:12]}"


def _default_root() -> Path:
    from sparse_recover.models import cache_dir

    return cache_dir() / "wiki-suite"


def _complete(folder: Path) -> bool:
    return all((folder / f"{n}-v{SUITE_VERSION}.jsonl").is_file() and (folder / f"{n}.yaml").is_file()
               for n in ALL_TASKS)


def wiki_suite_tasks(cache_root: str | Path | None = None) -> tuple[str, list[str]]:
    """Generate the suite once (cached) and return (include_path, ["wiki_lambada", "wiki_continuation"]).

    `include_path` is a folder for lm-eval's TaskManager(include_path=...); it also holds `wiki_ppl`.
    Raises DataError when the built-in wiki-en text is not installed.
    """
    from sparse_recover.data import wiki_en_part

    extracts = wiki_en_part("eval")
    root = Path(cache_root) if cache_root is not None else _default_root()
    folder = (root / f"v{SUITE_VERSION}-{source_hash(extracts)[:12]}").resolve()
    if not _complete(folder):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
        try:
            # YAMLs must name the final folder: build under tmp, then rewrite paths by generating configs
            # for the final location before the rename.
            items_paths = write_suite(tmp, extracts)
            import yaml

            final = {k: str(folder / v.name) for k, v in items_paths.items()}
            for name, cfg in task_configs(final).items():
                (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True),
                                                  encoding="utf-8")
            if folder.exists() and not _complete(folder):
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not _complete(folder):  # lost a race to a broken folder: give up loudly
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(folder), list(TASKS)

"""The built-in offline task suite: deterministic, held-out, well-formed items."""

from __future__ import annotations

import json
import re

import pytest

from sparse_recover.data import wiki_en_part
from sparse_recover.evaluate import wiki_suite


@pytest.fixture(scope="module")
def extracts():
    return wiki_en_part("eval")


@pytest.fixture(scope="module")
def train_set():
    return set(wiki_en_part("train"))


@pytest.fixture(scope="module")
def items(extracts):
    return wiki_suite.build_items(extracts)


def _norm(s: str) -> str:
    return " ".join(s.split())


def test_generation_is_deterministic(tmp_path, extracts, items):
    a = wiki_suite.write_suite(tmp_path / "a", extracts)
    b = wiki_suite.write_suite(tmp_path / "b", extracts)
    for name in wiki_suite.ALL_TASKS:
        assert a[name].name == f"{name}-v{wiki_suite.SUITE_VERSION}.jsonl"
        assert a[name].read_bytes() == b[name].read_bytes()
        rows = [json.loads(line) for line in a[name].read_text(encoding="utf-8").splitlines()]
        assert rows == items[name]
    assert wiki_suite.build_items(extracts) == items


def test_cached_suite_folder_and_yaml(tmp_path):
    import yaml

    folder, names = wiki_suite.wiki_suite_tasks(cache_root=tmp_path)
    again, _ = wiki_suite.wiki_suite_tasks(cache_root=tmp_path)
    assert folder == again and names == ["wiki_lambada", "wiki_continuation"]
    assert re.fullmatch(rf"v{wiki_suite.SUITE_VERSION}-[0-9a-f]{{12}}", folder.rsplit("/", 1)[-1])
    for name in wiki_suite.ALL_TASKS:
        cfg = yaml.safe_load(open(f"{folder}/{name}.yaml", encoding="utf-8"))
        path = cfg["dataset_kwargs"]["data_files"]["test"]
        assert cfg["task"] == name and cfg["dataset_path"] == "json" and path.startswith("/")
        assert open(path, encoding="utf-8").readline().startswith("{")
    # no temporary folder left behind
    assert [p.name for p in tmp_path.iterdir()] == [folder.rsplit("/", 1)[-1]]


def test_sizes_and_limit_friendly_order(items):
    assert 300 <= len(items["wiki_lambada"]) <= wiki_suite.MAX_ITEMS
    assert len(items["wiki_continuation"]) == wiki_suite.MAX_ITEMS
    for name in wiki_suite.ALL_TASKS:
        rows = items[name]
        assert [r["id"] for r in rows] == [f"{name}-{i:04d}" for i in range(len(rows))]
        assert len({r["source"] for r in rows}) == len(rows)  # at most one item per article
        first = [r["source"] for r in rows[:50]]
        assert first != sorted(first)  # shuffled: limit=N is a sample, not the first articles in file order


def test_items_come_from_held_out_text_only(items, extracts, train_set):
    for name in wiki_suite.ALL_TASKS:
        for row in items[name]:
            source = extracts[row["source"]]
            assert source not in train_set
    for row in items["wiki_lambada"]:
        source = extracts[row["source"]]
        assert source.startswith(row["context"] + " " + row["target"] + ".")
    eval_norm = [_norm(e) for e in extracts]
    for row in items["wiki_continuation"]:
        assert extracts[row["source"]].startswith(row["context"])
        for choice in row["choices"]:  # distractors too: sentences of other held-out articles
            owners = [i for i, e in enumerate(eval_norm) if choice in e]
            assert owners and all(extracts[i] not in train_set for i in owners)


def test_lambada_targets(items):
    for row in items["wiki_lambada"]:
        word = row["target"]
        assert word.isalpha() and word.isascii() and len(word) >= 4
        assert re.search(rf"\b{re.escape(word)}\b", row["context"], flags=re.IGNORECASE)
        assert len(row["context"].split()) >= wiki_suite.LAMBADA_MIN_CONTEXT_WORDS


def test_continuation_has_four_distinct_choices_one_gold(items, extracts):
    labels = []
    for row in items["wiki_continuation"]:
        choices = row["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert 0 <= row["label"] < 4
        source = _norm(extracts[row["source"]])
        in_source = [i for i, c in enumerate(choices) if c in source]
        assert in_source == [row["label"]]  # exactly one choice is the article's own next sentence
        gold = choices[row["label"]]
        assert source.startswith(_norm(row["context"] + " " + gold))
        labels.append(row["label"])
    counts = [labels.count(i) for i in range(4)]
    assert min(counts) > 0.18 * len(labels)  # gold positions are shuffled


def test_sentence_spans_keep_abbreviations_and_initials():
    text = "Dr. J. Smith was born in the U.S. in 1900. He moved to St. Louis, e.g. for work. It rained!"
    spans = wiki_suite.sentence_spans(text)
    assert [text[a:b] for a, b in spans] == [
        "Dr. J. Smith was born in the U.S. in 1900.",
        "He moved to St. Louis, e.g. for work.",
        "It rained!",
    ]

"""lm-eval on the in-memory model: wiki-suite, --data-dir (equal to the stock lm_eval), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparse_recover.errors import ConfigError, DataError
from sparse_recover.evaluate.harness import check_tasks, run_lm_eval
from tests.helpers import hand_written_tasks, stock_lm_eval_cli, write_jsonl

_THREADS = __import__("torch").get_num_threads()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tiny_models):
    import torch

    from sparse_recover.models import load_model, load_tokenizer

    path = tiny_models["llama"]
    return load_model(str(path), dtype=torch.float32), load_tokenizer(str(path)), path


def test_wiki_suite_on_tiny_model(llama):
    model, tok, _ = llama
    out = run_lm_eval(model, tok, ["wiki-suite"], limit=20, batch_size=4)
    assert set(out["tasks"]) == {"wiki_lambada", "wiki_continuation"}
    for name, entry in out["tasks"].items():
        assert 0.0 <= entry["acc"] <= 1.0
        assert entry["n_samples"]["effective"] == 20 and entry["n_shot"] == 0
        assert entry["source"] == "wiki-suite" and entry["version"] == 1.0
        assert Path(entry["data_files"]["test"]).is_file()
    assert 0.0 <= out["tasks"]["wiki_continuation"]["metrics"]["acc_norm"] <= 1.0
    assert out["tasks"]["wiki_lambada"]["metrics"]["perplexity"] > 1.0
    group = out["groups"]["wiki-suite"]
    assert group["complete"] and group["acc"] == pytest.approx(
        (out["tasks"]["wiki_lambada"]["acc"] + out["tasks"]["wiki_continuation"]["acc"]) / 2)
    assert out["lm_eval_version"].startswith("0.4") and out["limit"] == 20
    json.dumps(out)  # plain JSON


def _stock_results(model, tok, configs):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=configs, num_fewshot=0, bootstrap_iters=0, log_samples=False,
                                  task_manager=TaskManager(include_defaults=False))
    return res["results"]


def test_data_dir_equals_stock_lm_eval(llama, data_dir):
    model, tok, _ = llama
    ours = run_lm_eval(model, tok, ["boolq", "arc_easy"], data_dir=str(data_dir), batch_size=1)
    assert ours["tasks"]["boolq"]["source"] == "data-dir"
    assert ours["tasks"]["boolq"]["data_files"] == {"validation": str(data_dir / "boolq" / "validation.jsonl")}
    assert ours["tasks"]["boolq"]["n_samples"]["effective"] == 16
    assert ours["tasks"]["arc_easy"]["n_samples"]["effective"] == 12
    stock = _stock_results(model, tok, hand_written_tasks(data_dir))
    assert ours["tasks"]["boolq"]["acc"] == stock["boolq_local"]["acc,none"]
    assert ours["tasks"]["arc_easy"]["acc"] == stock["arc_local"]["acc,none"]
    assert ours["tasks"]["arc_easy"]["metrics"]["acc_norm"] == stock["arc_local"]["acc_norm,none"]


def test_data_dir_accepts_google_boolq_schema(llama, data_dir, tmp_path):
    model, tok, _ = llama
    rows = [json.loads(line) for line in (data_dir / "boolq" / "validation.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "boolq" / "validation.jsonl",
                 [{"question": r["question"], "passage": r["passage"], "answer": bool(r["label"])} for r in rows])
    a = run_lm_eval(model, tok, ["boolq"], data_dir=str(data_dir), batch_size=1, limit=8)
    b = run_lm_eval(model, tok, ["boolq"], data_dir=str(tmp_path), batch_size=1, limit=8)
    assert a["tasks"]["boolq"]["acc"] == b["tasks"]["boolq"]["acc"]


def test_missing_data_file_names_it(llama, data_dir):
    model, tok, _ = llama
    with pytest.raises(DataError, match=r"arc_challenge/test\.jsonl"):
        run_lm_eval(model, tok, ["arc_easy", "arc_challenge"], data_dir=str(data_dir))
    with pytest.raises(DataError) as err:  # every missing file of the request is named, on one line
        check_tasks(["zeroshot"], data_dir=str(data_dir))
    msg = str(err.value)
    assert "rte/validation.jsonl" in msg and "hellaswag/validation.jsonl" in msg and "(and 2 more)" in msg
    assert "boolq/" not in msg and "arc_easy/" not in msg and "\n" not in msg


def test_zeroshot_group_from_data_dir(llama, tmp_path):
    """All seven zero-shot tasks read local files in their Hugging Face schemas (stock prompts, including
    the tasks whose stock YAML preprocesses documents with !function helpers); the group is their mean."""
    model, tok, _ = llama
    n = 4
    write_jsonl(tmp_path / "boolq" / "validation.jsonl",
                 [{"question": f"is item {i} red", "passage": f"Item {i} is red.", "idx": i, "label": i % 2}
                  for i in range(n)])
    write_jsonl(tmp_path / "rte" / "validation.jsonl",
                 [{"sentence1": f"A man {i} walks.", "sentence2": "A man moves.", "label": i % 2, "idx": i}
                  for i in range(n)])
    write_jsonl(tmp_path / "hellaswag" / "validation.jsonl",
                 [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "then he",
                   "ctx": "A man cuts onions. then he", "endings": ["fries them.", "sings.", "flies.", "sleeps."],
                   "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)}
                  for i in range(n)])
    write_jsonl(tmp_path / "winogrande" / "validation.jsonl",
                 [{"sentence": "The trophy did not fit in the suitcase because _ was too big.", "option1": "trophy",
                   "option2": "suitcase", "answer": str(1 + i % 2)} for i in range(n)])
    arc = [{"id": f"q{i}", "question": "Which is a planet?",
            "choices": {"text": ["Mars", "Moon", "Sun", "Comet"], "label": ["A", "B", "C", "D"]},
            "answerKey": "ABCD"[i % 4]} for i in range(n)]
    write_jsonl(tmp_path / "arc_easy" / "test.jsonl", arc)
    write_jsonl(tmp_path / "arc_challenge" / "test.jsonl", arc)
    write_jsonl(tmp_path / "openbookqa" / "test.jsonl",
                 [{"id": f"q{i}", "question_stem": "The sun is a",
                   "choices": {"text": ["star", "planet", "moon", "rock"], "label": ["A", "B", "C", "D"]},
                   "answerKey": "ABCD"[i % 4]} for i in range(n)])
    assert check_tasks(["zeroshot", "ppl"], data_dir=str(tmp_path), extra_names=("ppl",)) == list(
        ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"))
    out = run_lm_eval(model, tok, ["boolq", "zeroshot"], data_dir=str(tmp_path), batch_size=2)
    group = out["groups"]["zeroshot"]
    assert group["complete"] and group["n_shot"] == 0 and len(group["tasks"]) == 7
    accs = [out["tasks"][t]["acc"] for t in group["tasks"]]
    assert all(0.0 <= a <= 1.0 for a in accs) and group["acc"] == pytest.approx(sum(accs) / 7)
    assert all(out["tasks"][t]["n_samples"]["effective"] == n for t in group["tasks"])
    assert out["versions"]["boolq"] == 2.0  # the stock task's own version


def test_bad_data_dir_rows_are_one_data_error(llama, tmp_path):
    model, tok, _ = llama
    write_jsonl(tmp_path / "boolq" / "validation.jsonl", [{"question": "q", "label": 1}])
    with pytest.raises(DataError, match=r"boolq/validation\.jsonl.*'passage' is undefined"):
        run_lm_eval(model, tok, ["boolq"], data_dir=str(tmp_path))


def test_unknown_task_lists_close_matches(llama):
    model, tok, _ = llama
    with pytest.raises(ConfigError, match=r"'arc_easyy' \(did you mean arc_easy"):
        run_lm_eval(model, tok, ["arc_easyy"])
    with pytest.raises(ConfigError, match=r"did you mean wiki-suite"):
        check_tasks(["wiki-suit"])
    with pytest.raises(ConfigError, match=r"did you mean ppl"):
        check_tasks(["zeroshot", "ppx"], extra_names=("ppl",))


def test_hub_task_offline_is_one_clear_data_error(llama, monkeypatch):
    model, tok, _ = llama
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        run_lm_eval(model, tok, ["arc_easy"], limit=2)
    msg = str(err.value)
    assert "arc_easy" in msg and "allenai/ai2_arc" in msg and "--data-dir" in msg and "wiki-suite" in msg
    assert "\n" not in msg and "Traceback" not in msg


@pytest.mark.slow
def test_data_dir_equals_stock_lm_eval_command_line(llama, data_dir, tmp_path):
    """The stock `lm_eval` command line on the saved checkpoint and hand-written task YAMLs gives our numbers."""
    model, tok, path = llama
    cli = stock_lm_eval_cli(path, data_dir, tmp_path)
    ours = run_lm_eval(model, tok, ["boolq", "arc_easy"], data_dir=str(data_dir), batch_size=1)
    assert ours["tasks"]["boolq"]["acc"] == cli["boolq_local"]["acc,none"]
    assert ours["tasks"]["arc_easy"]["acc"] == cli["arc_local"]["acc,none"]
    assert ours["tasks"]["arc_easy"]["metrics"]["acc_norm"] == cli["arc_local"]["acc_norm,none"]


@pytest.mark.slow
def test_mmlu_from_data_dir_five_shot(llama, tmp_path):
    """MMLU from one cais/mmlu-"all"-shaped file per split: 57 subjects, 5-shot, lm-eval's group aggregate."""
    from sparse_recover.evaluate.tasks import stock_leaves as _leaves

    model, tok, _ = llama
    subjects = [name[len("mmlu_"):] for name in _leaves("mmlu")[0]]
    assert len(subjects) == 57
    rows = {"dev": [], "test": []}
    for s in subjects:
        for split, n in (("dev", 5), ("test", 2)):
            for i in range(n):
                rows[split].append({"question": f"Question {i} about {s.replace('_', ' ')}?", "subject": s,
                                    "choices": ["one", "two", "three", "four"], "answer": (i + len(s)) % 4})
    for split, r in rows.items():
        write_jsonl(tmp_path / "mmlu" / f"{split}.jsonl", r)
    out = run_lm_eval(model, tok, ["mmlu"], data_dir=str(tmp_path), batch_size=4, limit=1)
    group = out["groups"]["mmlu"]
    assert len(group["tasks"]) == 57 and group["n_shot"] == 5
    assert "size-weighted" in group["aggregation"] and out["lm_eval_version"] in group["aggregation"]
    assert 0.0 <= group["acc"] <= 1.0
    assert {"mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences"} <= set(group["subgroups"])
    accs = [out["tasks"][t]["acc"] for t in group["tasks"]]
    assert group["acc"] == pytest.approx(sum(accs) / len(accs))  # limit=1: equal sizes
    assert all(out["tasks"][t]["n_shot"] == 5 for t in group["tasks"])


@pytest.mark.slow
def test_smollm2_wiki_suite_above_chance():
    import torch

    from sparse_recover.models import load_model, load_tokenizer, resolve_model_source

    source = resolve_model_source("smollm2-135m")
    model = load_model(source, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)  # a real model: all the cores again
    try:
        out = run_lm_eval(model, load_tokenizer(source.path), ["wiki-suite"], limit=100)
    finally:
        torch.set_num_threads(threads)
    assert out["tasks"]["wiki_continuation"]["acc"] > 0.45  # chance 0.25
    assert out["tasks"]["wiki_lambada"]["acc"] > 0.15  # chance ~0

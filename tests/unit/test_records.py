"""Typed run records: manifests written by the first release still read (the checked-in fixture was
written by sparse-recover at fc008d2: SparseGPT 50% -> DSnoT, perplexity of both), a manifest that fails
the schema is one line naming the field, and the pattern / eval-key strings round-trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sparse_recover.errors import ConfigError, RunDirError
from sparse_recover.records import EvalKey, Manifest, StageRecord
from sparse_recover.rundir import RunDir
from sparse_recover.sparsity.patterns import NM, Unstructured, parse_pattern

LEGACY = Path(__file__).resolve().parent.parent / "fixtures" / "legacy_run"


@pytest.fixture
def legacy(tmp_path) -> Path:
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    return run


def test_first_release_manifest_reads_typed(legacy):
    m = RunDir(legacy).manifest()
    prune, dsnot = m.stages["prune"], m.stages["dsnot"]
    assert prune.pattern == "unstructured:0.5" and prune.parsed_pattern() == Unstructured(0.5)
    assert (prune.group, prune.group_size) == ("block", 128)
    assert dsnot.group == "prune-rows" and dsnot.parsed_pattern() == Unstructured(0.5)
    assert m.model.spec == "tiny-llama-random" and m.format == 1
    # fields the schema does not declare survive: they are the stage's own report
    assert prune.model_extra["calibration"]["nsamples"] == "4" and dsnot.model_extra["swaps"] > 0


def test_first_release_manifest_round_trips(legacy):
    rd = RunDir(legacy)
    before = json.loads((legacy / "manifest.json").read_text())
    rd.write(rd.manifest())
    after = json.loads((legacy / "manifest.json").read_text())
    for stage in ("prune", "dsnot"):
        before["stages"][stage]["pattern"] = "unstructured:0.5"  # the one spelling that changes
    assert after == before


def test_first_release_run_reports(legacy, capsys):
    from sparse_recover.reporting import collect

    rows, _, _, _ = collect([str(legacy)])
    by_stage = {r["stage"]: r for r in rows}
    evals = {s: json.loads((legacy / "eval" / f"{s}.json").read_text()) for s in ("prune", "dsnot")}
    assert by_stage["prune"]["ppl wiki-en/64/limit2"] == evals["prune"]["ppl/wiki-en/64/limit2"]["ppl"]
    assert by_stage["dsnot"]["ppl wiki-en/64/limit2"] == evals["dsnot"]["ppl/wiki-en/64/limit2"]["ppl"]
    assert by_stage["dsnot"]["ppl wiki-en/64/limit2 vs pruned"] == pytest.approx(
        evals["dsnot"]["ppl/wiki-en/64/limit2"]["ppl"] / evals["prune"]["ppl/wiki-en/64/limit2"]["ppl"] - 1)
    assert by_stage["prune"]["pattern"] == "unstructured" and by_stage["dsnot"]["method"] == "sparsegpt + dsnot"


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["stages"]["prune"].update(group="diagonal"), "stages.prune.group"),
    (lambda m: m["stages"]["prune"].update(status="half-done"), "stages.prune.status"),
    (lambda m: m["stages"]["prune"].update(pattern="3:2"), "stages.prune.pattern"),
    (lambda m: m.update(format=99), "format"),
    (lambda m: m["model"].pop("spec"), "model.spec"),
])
def test_schema_violation_is_one_line_naming_the_field(legacy, edit, field):
    path = legacy / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    raw = path.read_bytes()
    with pytest.raises(RunDirError) as info:
        RunDir(legacy).manifest()
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and f"{field}:" in msg
    assert path.read_bytes() == raw


def test_pattern_spec_round_trips():
    for pattern in (Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(2, 8)):
        assert parse_pattern(pattern.spec) == pattern
    assert parse_pattern("unstructured:0.6", 0.6) == Unstructured(0.6)
    with pytest.raises(ConfigError):
        parse_pattern("unstructured:0.6", 0.5)
    with pytest.raises(ConfigError):
        parse_pattern("unstructured:lots")


def test_eval_key_round_trips():
    keys = [EvalKey.ppl("wiki-en", 2048), EvalKey.ppl("/data/my corpus/eval.txt", 64, 4),
            EvalKey.lm_eval(["boolq", "arc_easy", "boolq"], limit=8, shots=5, data_dir=True),
            EvalKey.lm_eval(["mmlu"])]
    for key in keys:
        assert EvalKey.parse(str(key)) == key
    assert str(keys[0]) == "ppl/wiki-en/2048" and str(keys[2]) == "lm-eval/arc_easy,boolq/limit8/shots5/data-dir"


def test_eval_key_canonical_reads_keys_of_earlier_versions():
    """Earlier versions keyed a perplexity file by the path as typed; the result's `data` (the resolved path
    or the source name) gives the key the same measurement has today. Other keys stay as they are."""
    result = {"ppl": 12.5, "data": "/work/m/corpus.jsonl", "seqlen": 64}
    assert EvalKey.canonical("ppl/m/corpus.jsonl/64/limit4", result) == "ppl//work/m/corpus.jsonl/64/limit4"
    assert EvalKey.canonical("ppl//work/m/corpus.jsonl/64", result) == "ppl//work/m/corpus.jsonl/64"
    assert EvalKey.canonical("ppl/Wiki-EN/128", {"data": "wiki-en"}) == "ppl/wiki-en/128"
    assert EvalKey.canonical("ppl/m/corpus.jsonl/64", {"ppl": 3.0}) == "ppl/m/corpus.jsonl/64"  # nothing to map by
    assert EvalKey.canonical("lm-eval/boolq/limit8", result) == "lm-eval/boolq/limit8"


def test_stage_record_identity_names_the_computation():
    a = StageRecord(finished="t1", masks_sha256="abc")
    assert a.identity() == "t1|abc" and StageRecord(finished="t2", masks_sha256="abc").identity() != a.identity()
    assert Manifest().dump() == {"format": 1, "stages": {}, "evals": {}}

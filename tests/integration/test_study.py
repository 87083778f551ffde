"""scripts/study.py (`make study`, `make claims`): the row sets, their configs and paper figures, and the runner end
to end on tiny-llama-random (--smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "study.py"
sys.path.insert(0, str(ROOT / "scripts"))

import study  # noqa: E402

from sparse_recover.config import apply_overrides, load_yaml, validate_pipeline  # noqa: E402


def _study(*args: str, runs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SPARSE_RECOVER_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--smoke", "--runs", str(runs)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1800)


def _table(out: str) -> list[list[str]]:
    """The markdown rows of the table printed after the title (header and separator dropped); the runs' own output
    before it (bench_finetune.py prints a table too) is not part of it."""
    text = out.splitlines()
    start = max(i for i, ln in enumerate(text) if ln.startswith(("Study on ", "Paper claims on ")))
    lines = [ln for ln in text[start:] if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:]]


def test_every_run_has_a_config_with_a_header_and_its_branches_share_the_parent_prefix():
    runs = study._runs()
    for name in ("wanda-2of4", "wanda-2of4-lors", "wanda-2of4-lors-kl", "wanda-75-lora-remask", "wanda-80-dsnot-paper"):
        assert name in runs, name
    assert runs["wanda-2of4-lors"].parent == "wanda-2of4" and runs["wanda-60-owl"].parent is None
    for run in runs.values():
        if run.config is None:
            continue
        first = run.config.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, run.config  # says what it measures
        cfg = validate_pipeline(apply_overrides(load_yaml(str(run.config)), run.sets(0, smoke=True)))
        assert cfg.model.model == "tiny-llama-random" and cfg.calib.seed == 0
        if run.parent:
            parent = runs[run.parent]
            assert study._prefix(run.config) == study._prefix(parent.config)
            assert study._prune_only(parent.config) and not study._prune_only(run.config)
    rows = {n for rowset in study.ROWSETS.values() for r in rowset() for n in r.runs}
    assert rows <= set(runs) and {r.name for r in runs.values()} - rows == set()  # every run is used by a row


def test_fine_tunes_compare_at_equal_steps_tokens_and_lr():
    budgets = set()
    for run in study._runs().values():
        if run.config is not None:
            ft = validate_pipeline(load_yaml(str(run.config))).finetune
            if ft is not None:
                budgets.add((ft.max_steps, ft.batch_size, ft.seqlen, ft.lr, ft.data))
    assert len(budgets) == 1, budgets


def test_claims_cite_the_papers_figures_from_published_yaml():
    rows = study.claims_rows()
    assert len(rows) >= 10
    figures = [r.paper() for r in rows]
    assert all(f for f in figures)
    by_label = dict(zip((r.label for r in rows), figures))
    spp75 = next(f for label, f in by_label.items() if "Wanda 75% model" in label)
    assert "SPP Table 3" in spp75 and "1285.24 -> 21.80" in spp75  # read from configs/papers/spp/published.yaml
    lors = next(f for label, f in by_label.items() if "LoRS >= SPP" in label)
    assert "LoRS Table 1" in lors and "54.34 vs 53.56" in lors
    dsnot = next(f for label, f in by_label.items() if "grows with sparsity" in label)
    assert "DSnoT Table 2" in dsnot and "70%: 26.79" in dsnot


def test_one_row_of_each_set_end_to_end_shares_runs_and_continues(tmp_path):
    """Study row 1 (dense, the wanda-2of4 run), then claims row 1 (SPP on a copy of that run after prune): the prefix is
    computed once, the branch fine-tunes the very same mask, and a re-run starts nothing."""
    runs = tmp_path / "runs"
    res = _study("study", "--rows", "1", runs=runs)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (row,) = _table(res.stdout)
    assert row[1] == "SmolLM2-135M dense" and float(row[2]) > 0 and 0 <= float(row[3]) <= 100
    assert "sparse-recover run configs/study/wanda-2of4.yaml" in row[-1]

    res = _study("claims", "--rows", "1", runs=runs)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "wanda-2of4 seed 0: complete" in res.stdout
    (row,) = _table(res.stdout)
    assert row[0] == "SPP" and "SPP Table 2" in row[2] and row[4] in ("holds", "does not hold", "mixed")
    assert "ppl " in row[3] and " -> " in row[3] and "cp -r" in row[-1]
    parent = json.loads((runs / "wanda-2of4" / "seed-0" / "manifest.json").read_text())
    branch = json.loads((runs / "wanda-2of4-spp" / "seed-0" / "manifest.json").read_text())
    assert branch["stages"]["prune"]["masks_sha256"] == parent["stages"]["prune"]["masks_sha256"]
    assert branch["stages"]["finetune"]["status"] == "complete" and branch["evals"]["merge"]

    res = _study("claims", "--rows", "1", runs=runs)
    assert res.returncode == 0 and "wanda-2of4-spp seed 0: complete" in res.stdout
    assert _table(res.stdout)[0][3] == row[3]


@pytest.mark.slow
@pytest.mark.parametrize("rowset", ["study", "claims"])
def test_whole_rowset_smoke(tmp_path, rowset):
    """Every row of the set runs on tiny-llama-random and gets a number or a verdict in every cell."""
    res = _study(rowset, runs=tmp_path / "runs")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _table(res.stdout)
    assert len(rows) == len(study.ROWSETS[rowset]())
    for row in rows:
        assert "not run yet" not in " ".join(row), row
        if rowset == "study":
            assert row[2] != "-" and row[3] != "-", row  # ppl and wiki-suite
        else:
            assert row[4] in ("holds", "does not hold", "mixed"), row

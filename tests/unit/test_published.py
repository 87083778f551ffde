"""Published values and paper configs (issue 14 parts 1-2): every published cell says where the paper prints it
(or why it is null), every cell's row has a config, every config's header names its paper and table and cites a
source for each setting, every shipped YAML validates. Each failure names the file. The checks themselves live
in scripts/make_table.py (`--check`), which refuses to compare a table whose published.yaml fails them."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from sparse_recover.config import load_yaml, validate_pipeline
from sparse_recover.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PAPERS = CONFIGS / "papers"
TEXTS = ROOT.parent / "shared" / "papers"  # the paper texts, where this checkout has them


def _load_make_table():
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "scripts" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_table"] = module
    spec.loader.exec_module(module)
    return module


mt = _load_make_table()

PUBLISHED = sorted(PAPERS.glob("*/published.yaml"))
PAPER_CONFIGS = sorted(p for p in PAPERS.glob("*/*.yaml") if p.name != "published.yaml" and p.parent.name != "extra")
EXTRA_CONFIGS = sorted((PAPERS / "extra").glob("*.yaml"))
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml")
                 if p.name not in ("published.yaml", "smoke.yaml") and "accelerate" not in p.parts)


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _problems_message(problems: list[str]) -> str:
    return "\n".join(problems)


# ------------------------------------------------------------------------------------------- the shipped tree


def test_the_three_papers_and_extra_are_there():
    assert {p.parent.name for p in PUBLISHED} == {"spp", "dsnot", "lors"}
    assert EXTRA_CONFIGS, "configs/papers/extra/ holds the configs no paper has a row for"


@pytest.mark.parametrize("path", PUBLISHED, ids=rel)
def test_published_cells_have_sources_or_reasons(path):
    problems = mt.published_problems(path)
    assert not problems, _problems_message(problems)


@pytest.mark.skipif(not TEXTS.is_dir(), reason="the paper texts (../shared/papers) are not in this checkout")
@pytest.mark.parametrize("path", PUBLISHED, ids=rel)
def test_verified_cells_are_on_their_line_of_the_paper_text(path):
    problems = mt.published_problems(path, TEXTS)
    assert not problems, _problems_message(problems)


def test_every_paper_config_is_a_table_row_and_cites_its_sources():
    problems = mt.tree_problems(PAPERS)
    assert not problems, _problems_message(problems)


@pytest.mark.parametrize("path", PAPER_CONFIGS + EXTRA_CONFIGS, ids=rel)
def test_config_header(path):
    if path.parent.name == "extra":
        problems = mt.config_problems(path)
    else:
        data = load_yaml(str(path.parent / "published.yaml"))
        tables = {int(k.removeprefix("table")) for k, t in data["tables"].items()
                  if any(r["config"] == path.name for r in t["rows"])}
        assert tables, f"{rel(path)}: no row of {rel(path.parent / 'published.yaml')} names it"
        problems = mt.config_problems(path, data["paper_key"], tables)
    assert not problems, _problems_message(problems)


@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_shipped_yaml_validates(path):
    try:
        validate_pipeline(load_yaml(str(path)))
    except ConfigError as exc:
        pytest.fail(f"{rel(path)}: {exc}")


def test_counts_of_filled_cells():
    """The cells the papers print, filled (issue 14 part 1); a drop means a value went missing."""
    counts = {}
    for path in PUBLISHED:
        data = load_yaml(str(path))
        for key, table in data["tables"].items():
            cells = [c for r in table["rows"] for c in r["cells"]]
            counts[f"{path.parent.name}-{key.removeprefix('table')}"] = sum(c["published"] is not None for c in cells)
    assert counts == {"dsnot-1": 63, "dsnot-2": 20, "dsnot-5": 9, "dsnot-8": 90, "dsnot-9": 44, "dsnot-10": 20,
                      "spp-2": 9, "spp-3": 24, "spp-4": 3, "spp-5": 8, "spp-6": 63, "spp-7": 27,
                      "lors-1": 18, "lors-2": 9, "lors-3": 4, "lors-4": 8}


def test_self_contradictions_are_stored_as_printed_with_a_note():
    lors = load_yaml(str(PAPERS / "lors" / "published.yaml"))
    row = next(r for r in lors["tables"]["table1"]["rows"] if r["id"] == "table1-llama3-8b-sparsegpt-2of4-lors")
    cell = next(c for c in row["cells"] if c["stage"] == "merge" and c["metric"] == "zeroshot_avg")
    assert cell["published"] == 57.94 and "57.12" in cell["note"]
    assert round(mt.tasks_avg(cell), 2) == 57.12
    dsnot = load_yaml(str(PAPERS / "dsnot" / "published.yaml"))
    notes = {(r["id"], c["stage"]): c.get("note", "") for r in dsnot["tables"]["table1"]["rows"] for c in r["cells"]}
    assert "Table 9" in notes[("table1-llama-7b-sparsegpt-60", "dsnot")]
    assert "Table 8" in notes[("table1-llama2-13b-wanda-60", "prune")]
    spp = load_yaml(str(PAPERS / "spp" / "published.yaml"))
    assert "swapped" in spp["tables"]["table2"]["note"]


def test_paper_rows_and_protocols():
    """Part 2: SPP has no 4:8 rows, Table 3 is Wanda only, Table 4 has no r = 32; LoRS Table 1 trains on
    Alpaca at the paper's batch and learning rate for every method, Table 4 on SlimPajama at 256k tokens."""
    spp = load_yaml(str(PAPERS / "spp" / "published.yaml"))
    ids = [r["id"] for t in spp["tables"].values() for r in t["rows"]]
    assert not [i for i in ids if "4of8" in i or "r32" in i]
    assert all("wanda" in r["id"] for r in spp["tables"]["table3"]["rows"])
    lors = load_yaml(str(PAPERS / "lors" / "published.yaml"))
    for key, (data, batch, seqlen) in {"table1": ("alpaca", 32, 512), "table4": ("slimpajama", 125, 2048)}.items():
        for row in lors["tables"][key]["rows"]:
            ft = validate_pipeline(load_yaml(str(PAPERS / "lors" / row["config"]))).finetune.resolved()
            assert (ft["data"], ft["batch_size"], ft["seqlen"], ft["lr"]) == (data, batch, seqlen, 2e-5), row["id"]
    assert 125 * 2048 == 256_000


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def tree(tmp_path):
    """A copy of configs/papers to break."""
    dst = tmp_path / "papers"
    shutil.copytree(PAPERS, dst)
    return dst


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def test_a_cell_without_source_fields_names_the_file(tree):
    pub = tree / "dsnot" / "published.yaml"
    _edit(pub, "        source:\n          paper: DSnoT\n          table: 5\n",
          "        sauce:\n          paper: DSnoT\n          table: 5\n")
    problems = mt.published_problems(pub)
    assert problems and all(str(pub) in p for p in problems)
    assert any("no source" in p for p in problems)


def test_a_null_without_reason_and_a_wrong_value_are_refused(tree):
    pub = tree / "spp" / "published.yaml"
    _edit(pub, "        reason: SPP prints", "        because: SPP prints")
    _edit(pub, "        published: 54.18\n", "        published: 54.81\n")
    problems = mt.published_problems(pub)
    assert any("null without a reason" in p for p in problems), problems
    assert any("is not the printed '54.18'" in p for p in problems), problems
    assert all(str(pub) in p for p in problems)


def test_a_cell_whose_row_has_no_config_names_the_file(tree):
    (tree / "dsnot" / "table5-llama7b-wanda-4of8.yaml").unlink()
    problems = mt.tree_problems(tree)
    assert any(str(tree / "dsnot" / "published.yaml") in p and "table5-llama7b-wanda-4of8.yaml, which does not exist"
               in p for p in problems), problems


def test_a_config_without_its_paper_table_header_names_the_file(tree):
    cfg = tree / "spp" / "table4-llama7b-wanda-2of4-r8.yaml"
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("#")) + "\n")
    problems = mt.tree_problems(tree)
    assert [p for p in problems if p.startswith(str(cfg))] == [f"{cfg}: no header comment (paper, table and the "
                                                              "source of every setting)"]


def test_an_uncited_setting_and_a_wrong_table_are_named(tree):
    cfg = tree / "lors" / "table4-llama3-8b-wanda-2of4-spp.yaml"
    _edit(cfg, "Table 4: Llama-3-8B", "Table 1: Llama-3-8B")
    _edit(cfg, "  lr: 2.0e-05\n", "  lr: 2.0e-05\n  gradient_checkpointing: true\n")
    problems = [p for p in mt.tree_problems(tree) if p.startswith(str(cfg))]
    assert any("does not name LoRS Table 4" in p for p in problems), problems
    assert any("setting finetune.gradient_checkpointing has no source" in p for p in problems), problems


def test_a_citation_that_names_no_source_is_refused(tree):
    cfg = tree / "dsnot" / "table5-llama7b-sparsegpt-4of8.yaml"
    _edit(cfg, "#   calib.seed 0: not stated in the paper; from the reference code at zyxxmu/DSnoT main.py",
          "#   calib.seed 0: we like it; see zyxxmu/DSnoT main.py")
    problems = [p for p in mt.tree_problems(tree) if p.startswith(str(cfg))]
    assert problems == [f"{cfg}: the source of calib.seed names no paper section/table and does not say 'not stated "
                        "in the paper; from the reference code at <file>' (or 'ours')"]


def test_a_config_no_row_names_must_move_to_extra(tree):
    stray = tree / "spp" / "table2-llama7b-wanda-4of8.yaml"
    shutil.copy(tree / "extra" / "spp-llama7b-wanda-4of8.yaml", stray)
    problems = mt.tree_problems(tree)
    assert any(p.startswith(f"{stray}: no row of") and "extra" in p for p in problems), problems
    extra = tree / "extra" / "spp-llama7b-sparsegpt-75.yaml"
    _edit(extra, "# EXTRA, NOT A PAPER ROW:", "# SPP Table 3:")
    assert any(p.startswith(f"{extra}: an extra config's header") for p in mt.tree_problems(tree))


def test_make_table_never_compares_extra():
    with pytest.raises(SystemExit, match="never compared with a paper"):
        mt.table_rows("extra-1")
    assert "lors-4" in mt.available_tables() and not [t for t in mt.available_tables() if t.startswith("extra")]


# ------------------------------------------------------------------------------------------- make_table output


def test_make_table_prints_printed_and_recomputed_average(tmp_path, capsys):
    data, rows, folder = mt.table_rows("lors-1")
    out = mt.print_table("lors-1", data, rows, folder, tmp_path / "runs", smoke=False)
    text = capsys.readouterr().out
    assert "| published | tasks avg | ours | delta | status |" in text
    line = next(t for t in text.splitlines() if t.startswith("| Llama-3-8B SparseGPT 2:4 + LoRS | +LoRS zero-shot"))
    assert "| 57.94 | 57.12 (!= printed) | - |" in line
    assert "57.12" in text.split(line)[1]  # the note is printed below the table
    llama2 = next(t for t in text.splitlines() if t.startswith("| Llama-2-7B SparseGPT 2:4 + LoRS | +LoRS zero-shot"))
    assert "| 56.33 | 56.33 | - |" in llama2
    assert {o["row"] for o in out} == {r["id"] for r in rows}


def _fake_cli(refuses: str) -> str:
    """A stand-in CLI for make_table's row loop: logs each call, and exits 3 (model unreachable) for the 65B
    configs when `refuses` (a Python condition on sys.argv) holds."""
    return textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        config = Path(sys.argv[sys.argv.index("run") + 1]).name
        Path(sys.argv[1]).open("a").write(" ".join(["dry" if "--dry-run" in sys.argv else "run", config]) + "\\n")
        if "llama-65b" in config and ({refuses}):
            print("sparse-recover: error: model huggyllama/llama-65b cannot be reached: it needs the Hugging Face hub",
                  file=sys.stderr)
            sys.exit(3)
    """)


FAKE_CLI = _fake_cli("True")


def test_a_model_without_hub_access_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    fake = tmp_path / "fake_cli.py"
    fake.write_text(FAKE_CLI)
    log = tmp_path / "calls.txt"
    data, rows, folder = mt.table_rows("dsnot-1")
    rc = mt.run_rows("dsnot-1", rows, folder, tmp_path / "runs", False, [sys.executable, str(fake), str(log)])
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["make_table: 3 row(s) not run (table1-llama-65b-magnitude-60, table1-llama-65b-sparsegpt-60, "
                   "table1-llama-65b-wanda-60): model huggyllama/llama-65b cannot be reached: it needs the Hugging "
                   "Face hub"]
    calls = log.read_text().splitlines()
    assert len([c for c in calls if c.startswith("dry")]) == 9  # one dry run per model
    runs = [c.split()[1] for c in calls if c.startswith("run")]
    assert len(runs) == 24 and not [c for c in runs if "65b" in c]
    assert not (tmp_path / "runs").exists()  # the fake wrote nothing; make_table itself writes nothing either


# ------------------------------------------------------------------------------------------- issue 14 part 3


def _makefile_tables() -> list[str]:
    line = next(t for t in (ROOT / "Makefile").read_text().splitlines() if t.startswith("TABLES :="))
    return line.split(":=", 1)[1].split()


def test_every_published_table_has_a_make_target_and_back():
    assert sorted(_makefile_tables()) == sorted(mt.available_tables())
    for table in ("spp-5", "spp-6", "spp-7", "lors-2", "lors-3", "dsnot-2", "dsnot-8", "dsnot-9", "dsnot-10"):
        assert table in _makefile_tables(), table


def test_the_new_tables_cover_the_papers_grids():
    """Each table's rows map to configs, and they span the grid the paper prints (columns x rows)."""
    def cells(paper, key):
        data = load_yaml(str(PAPERS / paper / "published.yaml"))
        return [(r, c) for r in data["tables"][key]["rows"] for c in r["cells"]]

    def cfg(paper, row):
        return validate_pipeline(load_yaml(str(PAPERS / paper / row["config"])))

    t8 = cells("dsnot", "table8")
    assert {(cfg("dsnot", r).model.model, round(100 * cfg("dsnot", r).prune.sparsity)) for r, _ in t8} == {
        (m, s) for m in ("huggyllama/llama-7b", "huggyllama/llama-13b", "meta-llama/Llama-2-7b-hf",
                         "meta-llama/Llama-2-13b-hf", "facebook/opt-13b") for s in range(10, 100, 10)}
    t9 = cells("dsnot", "table9")
    assert sorted({cfg("dsnot", r).calib.nsamples for r, _ in t9}) == [1, 2, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert {cfg("dsnot", r).prune.sparsity for r, _ in t9} == {0.6}  # the numbers are 60% (caption says 50%)
    t10 = cells("dsnot", "table10")
    assert all(r["seeds"] == [0, 1, 2, 3, 4] and "published_std" in c for r, c in t10)
    t6 = cells("spp", "table6")
    assert all(c["metric"] == "mmlu" and "mmlu" in cfg("spp", r).eval.tasks for r, c in t6)
    assert len({cfg("spp", r).model.model for r, _ in t6}) == 7
    t5 = cells("spp", "table5")
    assert sorted(cfg("spp", r).finetune.method for r, _ in t5) == ["lora-remask"] * 4 + ["spp"] * 4
    assert all(cfg("spp", r).finetune.rank == 8 for r, _ in t5 if cfg("spp", r).finetune.method == "lora-remask")
    t3 = cells("spp", "table3")
    assert sum(c["stage"] == "dsnot" for _, c in t3) == 8 and all(cfg("spp", r).dsnot for r, c in t3
                                                                   if c["stage"] == "dsnot")
    lors3 = cells("lors", "table3")
    assert {cfg("lors", r).prune.pattern for r, _ in lors3} == {"unstructured"}
    lors2 = cells("lors", "table2")
    assert {cfg("lors", r).model.model for r, _ in lors2} == {"meta-llama/Llama-2-13b-hf"}


def test_a_shared_config_must_name_every_table_that_uses_it(tree):
    cfg = tree / "dsnot" / "table1-llama-7b-wanda-60.yaml"
    _edit(cfg, "# Also DSnoT Table 10: five calibration seeds", "# Also: five calibration seeds")
    problems = [p for p in mt.tree_problems(tree) if p.startswith(str(cfg))]
    assert problems == [f"{cfg}: header does not name DSnoT Table 10 (its published.yaml row)"]


def test_a_seed_mean_whose_std_is_not_printed_and_bad_seeds_are_refused(tree):
    pub = tree / "dsnot" / "published.yaml"
    _edit(pub, "        published_std: 0.04\n", "        published_std: 0.05\n")
    _edit(pub, "      seeds:\n      - 0\n      - 1\n", "      seeds:\n      - 0\n      - 0\n")
    problems = mt.published_problems(pub, TEXTS if TEXTS.is_dir() else None)
    assert any("published_std 0.05 is not the printed '0.04'" in p for p in problems), problems
    assert any("seeds must be two or more distinct integers" in p for p in problems), problems
    assert all(p.startswith(str(pub)) for p in problems)


def test_table10_runs_each_row_once_per_seed_and_prints_mean_and_std(tmp_path, monkeypatch, capsys):
    data, rows, folder = mt.table_rows("dsnot-10")
    runs = mt.row_runs("dsnot-10", rows[0], folder, tmp_path, False)
    assert [sets for _, sets in runs] == [[f"calib.seed={s}"] for s in range(5)]
    assert [d.name for d, _ in runs] == [f"seed-{s}" for s in range(5)]
    smoke = mt.row_runs("dsnot-10", rows[0], folder, tmp_path, True)
    assert len({d for d, _ in smoke}) == 5  # seeds stay distinct on the tiny model

    # fake eval results: seed s gives published + s/100 (the 5th seed has no result yet)
    def fake(run_dir, stage, metric):
        row = next(r for r in rows if r["id"] == run_dir.parent.name)
        cell = next(c for c in row["cells"] if c["stage"] == stage)
        s = int(run_dir.name.removeprefix("seed-"))
        return None if s == 4 else cell["published"] + s / 100

    monkeypatch.setattr(mt, "ours", fake)
    out = mt.print_table("dsnot-10", data, rows, folder, tmp_path, smoke=False)
    first = out[0]
    assert first["seeds_done"] == 4 and first["published_std"] == 0.04
    assert first["ours"] == pytest.approx(first["published"] + 0.015)
    assert first["ours_std"] == pytest.approx(0.0111803, abs=1e-6)  # population std of 0, .01, .02, .03
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if t.startswith("| LLaMA-7B SparseGPT 60% | SparseGPT | prune |"))
    assert f"| 10.42 (±0.04) | - | {mt.fmt(first['ours'])} (±0.01, 4/5 seeds) | 0.01 (+0.1%) |" in line


def test_table9_smoke_keeps_the_number_of_calibration_sequences(tmp_path):
    data, rows, folder = mt.table_rows("dsnot-9")
    keep = mt.smoke_keep(data, "dsnot-9")
    assert keep == ("calib.nsamples",)
    dirs = {}
    for row in rows:
        (run_dir, sets), = mt.row_runs("dsnot-9", row, folder, tmp_path, True, keep)
        assert not any(s.startswith("calib.nsamples=") for s in sets)
        assert "model.model=\"tiny-llama-random\"" in sets
        dirs[run_dir] = row["id"]
    assert len(dirs) == len(rows)  # 11 counts x 2 pruners stay 22 distinct smoke runs


def test_a_new_table_without_hub_access_is_one_line_per_model(tmp_path, capsys):
    fake = tmp_path / "fake_cli.py"
    fake.write_text(FAKE_CLI)
    log = tmp_path / "calls.txt"
    data, rows, folder = mt.table_rows("dsnot-2")
    rc = mt.run_rows("dsnot-2", rows, folder, tmp_path / "runs", False, [sys.executable, str(fake), str(log)])
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make_table: 5 row(s) not run (table2-llama-65b-wanda-50, ")
    runs = [c.split()[1] for c in log.read_text().splitlines() if c.startswith("run")]
    assert runs == [r["config"] for r in rows if "65b" not in r["id"]]


def _smoke_table(tmp_path, table, *extra):
    import os
    import subprocess

    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_table.py"), table, "--run", "--smoke",
                          "--runs", str(tmp_path), *extra], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [t.split(" | ") for t in res.stdout.splitlines() if t.startswith("| LLaMA-V1-")]


def test_make_table_smoke_end_to_end_for_a_new_table(tmp_path):
    """`make_table.py dsnot-2 --run --smoke` on two rows (7B and 65B at 50%, one run on the tiny model: prune,
    DSnoT, perplexity): the dry-run check, the run, the shared smoke run and every cell filled from its manifest."""
    lines = _smoke_table(tmp_path, "dsnot-2", "--rows", "table2-llama-7b-wanda-50,table2-llama-65b-wanda-50")
    assert len(list((tmp_path / "dsnot-2-smoke").iterdir())) == 1  # both rows are one tiny-model run
    assert len(lines) == 4
    for cols in lines:  # | row | column | stage | published | tasks avg | ours | delta | status |
        assert float(cols[5]) > 0 and cols[6] != "-", cols


@pytest.mark.slow
def test_make_table_smoke_of_a_whole_new_table(tmp_path):
    lines = _smoke_table(tmp_path, "dsnot-2")
    assert len(list((tmp_path / "dsnot-2-smoke").iterdir())) == 5  # one run per sparsity, 7B and 65B shared
    assert len(lines) == 20 and all(float(cols[5]) > 0 for cols in lines)


def test_a_row_sharing_another_tables_config_reads_that_rows_run(tmp_path, tree):
    data, rows, folder = mt.table_rows("spp-6")
    row = next(r for r in rows if r["id"] == "table6-llama7b-wanda-50")
    assert mt.row_runs("spp-6", row, folder, tmp_path, False) == [(tmp_path / "spp-2" / "table2-llama7b-wanda-50", [])]
    row = next(r for r in rows if r["id"] == "table6-llama13b-wanda-50")
    assert mt.row_runs("spp-6", row, folder, tmp_path, False) == [(tmp_path / "spp-6" / "table6-llama13b-wanda-50", [])]
    pub = tree / "spp" / "published.yaml"
    _edit(pub, "      same_run_as: spp-2/table2-llama7b-wanda-50\n",
          "      same_run_as: spp-2/table2-llama7b-wanda-2of4\n")
    problems = mt.published_problems(pub)
    assert problems == [f"{pub}: table6 row table6-llama7b-wanda-50: same_run_as 'spp-2/table2-llama7b-wanda-2of4' "
                        "runs table2-llama7b-wanda-2of4.yaml, not this row's table2-llama7b-wanda-50.yaml"]


FAKE_CLI_RUN_REFUSES = _fake_cli('"--dry-run" not in sys.argv')  # planned from known shapes, weights not cached


def test_a_model_the_dry_run_plans_but_the_run_cannot_load_is_still_one_line(tmp_path, capsys):
    fake = tmp_path / "fake_cli.py"
    fake.write_text(FAKE_CLI_RUN_REFUSES)
    log = tmp_path / "calls.txt"
    data, rows, folder = mt.table_rows("dsnot-2")
    rc = mt.run_rows("dsnot-2", rows, folder, tmp_path / "runs", False, [sys.executable, str(fake), str(log)])
    assert rc == 3
    err = [t for t in capsys.readouterr().err.splitlines() if t.startswith("make_table:")]
    assert err == ["make_table: 5 row(s) not run (table2-llama-65b-wanda-50, table2-llama-65b-wanda-60, "
                   "table2-llama-65b-wanda-70, table2-llama-65b-wanda-80, table2-llama-65b-wanda-90): model "
                   "huggyllama/llama-65b cannot be reached: it needs the Hugging Face hub"]
    runs = [c.split()[1] for c in log.read_text().splitlines() if c.startswith("run")]
    assert [c for c in runs if "65b" not in c] == [r["config"] for r in rows if "65b" not in r["id"]]
    assert len([c for c in runs if "65b" in c]) == 1  # tried once, then its other rows are left alone

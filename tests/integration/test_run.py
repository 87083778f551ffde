"""`sparse-recover run`: the demo pipeline on a tiny model, skipping, resuming after a crash or a kill,
--from / --until, refusing to mix configs, --dry-run, and the paper-table plumbing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparse_recover.config import validate_pipeline
from sparse_recover.errors import ConfigError, RunDirError
from tests.helpers import run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def pipeline(model_dir, calib_file, eval_file, **sections):
    """The demo's shape (Wanda 2:4, DSnoT, LoRS, merge, audit, eval of every stage) at toy sizes."""
    data = {
        "model": {"model": str(model_dir), "device": "cpu"},
        "calib": {"source": str(calib_file), "nsamples": 3, "seqlen": 32},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "dsnot": {"max_cycles": 20, "threshold": 0.0},
        "finetune": {"method": "lors", "data": str(calib_file), "seqlen": 32, "max_steps": 4, "batch_size": 4,
                     "micro_batch_size": 2, "val_size": 8, "max_train_samples": 64, "init_samples": 8,
                     "lr": 5e-3, "save_every": 2, "eval_every": 4, "mixed_precision": "no"},
        "merge": {},
        "eval": {"stages": ["dense", "prune", "dsnot", "merge"], "tasks": ["ppl"], "ppl_data": str(eval_file),
                 "seqlen": 64, "limit": 2},
    }
    for key, value in sections.items():
        data[key] = value
    return data


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args, env=None):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparse_recover", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT)


def files(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())


def result(run):
    """What must be identical between two runs of the same pipeline: masks and eval numbers."""
    m = json.loads((run / "manifest.json").read_text())
    masks = {s: m["stages"][s]["masks_sha256"] for s in ("prune", "dsnot", "merge")}
    ppl = {s: [v["ppl"] for v in m["evals"][s].values()] for s in ("dense", "prune", "dsnot", "merge")}
    return masks, ppl


CHECKPOINT = ["config.json", "generation_config.json", "masks.safetensors", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"]
FINETUNE = ["adapter.safetensors", "adapter_config.json", "trainer_log.json", "training_state/adapter.safetensors",
            "training_state/optimizer.pt", "training_state/rng-0.pt", "training_state/scheduler.pt",
            "training_state/state.json"]


@pytest.fixture(scope="module")
def reference(tiny_models, calib_file, eval_file, tmp_path_factory):
    """One uninterrupted run of the demo-shaped pipeline."""
    run = tmp_path_factory.mktemp("ref") / "run"
    cfg = validate_pipeline(pipeline(tiny_models["llama"], calib_file, eval_file))
    run_pipeline(cfg, run)
    return run


def test_demo_pipeline_files_audits_sparsity(reference):
    run = reference
    got = files(run)
    expected = (["calib/windows.safetensors"]
                + [f"{s}/{f}" for s in ("dsnot", "merge", "prune") for f in CHECKPOINT]
                + [f"eval/{s}.json" for s in ("dense", "dsnot", "merge", "prune")]
                + [f"logs/{s}.log" for s in ("audit", "dsnot", "eval", "finetune", "merge", "prune")]
                + [f"finetune/{f}" for f in FINETUNE] + ["manifest.json"])
    assert got == sorted(expected), got
    assert not any(p.name.startswith(".") for p in run.iterdir())  # no temporary folder left behind
    m = json.loads((run / "manifest.json").read_text())
    assert all(m["stages"][s]["status"] == "complete" for s in ("prune", "dsnot", "finetune", "merge"))
    audit = m["pipeline"]["audit"]["stages"]
    assert set(audit) == {"prune", "dsnot", "merge"}
    for stage, info in audit.items():
        assert info["ok"] and info["pruned_nonzero"] == 0
        assert abs(info["overall_sparsity"] - 0.5) <= 0.001, stage
    assert m["stages"]["finetune"]["from"] == "dsnot"
    assert set(m["pipeline"]["inputs"]) == {"prune", "dsnot", "finetune", "merge"}
    assert m["pipeline"]["config"]["prune"]["pattern"] == "2:4"


def test_rerun_skips_every_completed_stage(reference, tiny_models, calib_file, eval_file, capsys):
    def unchanged(p):  # the manifest and the append-only logs (audit and eval log every pass) may change
        return p.is_file() and p.name != "manifest.json" and p.parent.name != "logs"

    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if unchanged(p)}
    cfg = validate_pipeline(pipeline(tiny_models["llama"], calib_file, eval_file))
    run_pipeline(cfg, reference)
    out = capsys.readouterr().out
    for stage in ("prune", "dsnot", "finetune", "merge"):
        assert f"== {stage}: skip" in out
    assert "already measured" in out
    after = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if unchanged(p)}
    assert before == after


def test_crash_inside_a_stage_then_rerun_matches_uninterrupted(reference, tiny_models, calib_file, eval_file,
                                                                 tmp_path, monkeypatch):
    import sparse_recover.refine as refine

    run = tmp_path / "run"
    cfg = validate_pipeline(pipeline(tiny_models["llama"], calib_file, eval_file))
    real = refine.dsnot_refine
    calls = {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in the middle of dsnot")
        return real(*args, **kwargs)

    monkeypatch.setattr(refine, "dsnot_refine", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(cfg, run)
    monkeypatch.setattr(refine, "dsnot_refine", real)
    m = json.loads((run / "manifest.json").read_text())
    assert set(m["stages"]) == {"prune"} and not (run / "dsnot").exists()
    assert not any(p.name.startswith(".dsnot") for p in run.iterdir())
    run_pipeline(cfg, run)
    assert result(run) == result(reference)
    # a lost completion record (the stage's folder is there, the manifest does not say complete) redoes it
    m = json.loads((run / "manifest.json").read_text())
    del m["stages"]["merge"]
    (run / "manifest.json").write_text(json.dumps(m))
    run_pipeline(cfg, run)
    assert result(run) == result(reference)


def test_killed_during_finetune_resumes_to_the_same_result(reference, tiny_models, calib_file, eval_file, tmp_path):
    run = tmp_path / "run"
    config = write_yaml(tmp_path / "p.yaml", pipeline(tiny_models["llama"], calib_file, eval_file))
    killed = cli("run", config, "--run-dir", run, env={"SPARSE_RECOVER_KILL_AFTER_STEP": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    m = json.loads((run / "manifest.json").read_text())
    assert "finetune" not in m["stages"] and m["stages"]["dsnot"]["status"] == "complete"
    again = cli("run", config, "--run-dir", run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== prune: skip" in again.stdout and "== finetune: resume" in again.stdout
    assert json.loads((run / "manifest.json").read_text())["stages"]["finetune"]["train"]["resumed_from"]
    assert result(run) == result(reference)


def test_from_until_and_missing_inputs(tiny_models, calib_file, eval_file, tmp_path):
    run = tmp_path / "run"
    data = pipeline(tiny_models["llama"], calib_file, eval_file, finetune=None, merge=None,
                    eval={"stages": ["prune", "dsnot"], "tasks": ["ppl"], "ppl_data": str(eval_file), "seqlen": 64,
                          "limit": 2})
    cfg = validate_pipeline(data)
    with pytest.raises(RunDirError, match=r"cannot start at dsnot: it reads .*prune, which is not complete"):
        run_pipeline(cfg, run, from_stage="dsnot")
    assert not run.exists()
    with pytest.raises(ConfigError, match="--from finetune: the config has no finetune stage"):
        run_pipeline(cfg, run, from_stage="finetune")
    with pytest.raises(ConfigError, match="comes after"):
        run_pipeline(cfg, run, from_stage="eval", until_stage="prune")
    run_pipeline(cfg, run, until_stage="prune")
    m = json.loads((run / "manifest.json").read_text())
    assert set(m["stages"]) == {"prune"} and not m["evals"]
    with pytest.raises(RunDirError, match=r"cannot start at eval: it reads .*dsnot"):
        run_pipeline(cfg, run, from_stage="eval")
    run_pipeline(cfg, run, from_stage="dsnot")
    m = json.loads((run / "manifest.json").read_text())
    assert set(m["stages"]) == {"prune", "dsnot"} and set(m["evals"]) == {"prune", "dsnot"}
    # --force redoes the selected stage and every later one, same config -> same masks
    sha = m["stages"]["dsnot"]["masks_sha256"]
    run_pipeline(cfg, run, from_stage="dsnot", force=True)
    m2 = json.loads((run / "manifest.json").read_text())
    assert m2["stages"]["dsnot"]["finished"] >= m["stages"]["dsnot"]["finished"]
    assert m2["stages"]["dsnot"]["masks_sha256"] == sha and m2["stages"]["prune"] == m["stages"]["prune"]


def test_changed_config_is_refused_not_mixed(tiny_models, calib_file, eval_file, tmp_path):
    run = tmp_path / "run"
    data = pipeline(tiny_models["llama"], calib_file, eval_file, finetune=None, merge=None, eval=None)
    config = write_yaml(tmp_path / "p.yaml", data)
    assert cli("run", config, "--run-dir", run).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = cli("run", config, "--run-dir", run, "--set", "dsnot.targets=all")
    assert out.returncode == 5 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "dsnot stage" in out.stderr and "targets: 'attn' -> 'all'" in out.stderr and "--force" in out.stderr
    out = cli("run", config, "--run-dir", run, "--set", "calib.nsamples=4", "--from", "dsnot")
    assert out.returncode == 5 and "prune stage" in out.stderr and "calib.nsamples: 3 -> 4" in out.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # execution-only settings may change
    assert cli("run", config, "--run-dir", run, "--set", "prune.offload=true", "--set", "dsnot.batch_size=2"
               ).returncode == 0
    out = cli("run", config, "--run-dir", run, "--set", "dsnot.targets=all", "--force")
    assert out.returncode == 0 and "== dsnot: redo" in out.stdout


def test_bad_yaml_one_line_all_problems(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"model": {"model": "x", "colour": 1}, "prune": {"method": "nope"},
                                             "merge": {}, "eval": {"stages": ["dsnot"]}})
    out = cli("run", bad, "--run-dir", tmp_path / "run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    for part in ("model.colour: unknown key", "prune.method: unknown prune method", "merge: merge needs a finetune",
                 "eval.stages.0: the pipeline never produces a dsnot stage"):
        assert part in out.stderr, part
    assert not (tmp_path / "run").exists()
    out = cli("run", tmp_path / "missing.yaml", "--run-dir", tmp_path / "run")
    assert out.returncode == 2 and "config file not found" in out.stderr


def test_hub_model_without_network_is_one_line(tmp_path):
    config = write_yaml(tmp_path / "p.yaml", {"model": {"model": "no-such-org/no-such-model-xyz"},
                                              "prune": {"pattern": "2:4"}})
    out = cli("run", config, "--run-dir", tmp_path / "run", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 3 and out.stderr.count("\n") == 1
    assert "no-such-org/no-such-model-xyz cannot be reached: it needs the Hugging Face hub" in out.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_plan_offline(tiny_models, calib_file, eval_file, tmp_path):
    config = write_yaml(tmp_path / "p.yaml", pipeline(tiny_models["llama"], calib_file, eval_file))
    out = cli("run", config, "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for stage in ("prune", "dsnot", "finetune", "merge", "audit", "eval"):
        assert any(line.startswith(stage) for line in lines), stage
    assert "device at hand" in out.stdout and "prune/ calib/" in out.stdout and "-> merge/" in out.stdout
    assert not (tmp_path / "run").exists()
    # on a completed run directory it says what would be skipped
    run = tmp_path / "run"
    data = pipeline(tiny_models["llama"], calib_file, eval_file, finetune=None, merge=None, eval=None)
    small = write_yaml(tmp_path / "small.yaml", data)
    assert cli("run", small, "--run-dir", run, "--until", "prune").returncode == 0
    out = cli("run", small, "--run-dir", run, "--dry-run")
    status = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()
              if line.split() and line.split()[0] in ("prune", "dsnot")}
    assert status == {"prune": "skip", "dsnot": "run"}


def test_dry_run_builtin_alias_reads_no_weights(tmp_path):
    """smollm2-135m's plan comes from its config (cache or GGUF header) with the hub off."""
    out = cli("run", ROOT / "configs" / "demo.yaml", "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m (LlamaForCausalLM, 134.5M parameters, 30 blocks" in out.stdout


def test_memory_estimate_formula_bounds():
    """The estimate never counts less than what must be resident, nor more than a small multiple of it.
    The ~50M-parameter shape (200 MB in float32) read from its config alone; the estimates next to the
    memory really used: scripts/bench_plan_memory.py."""
    from transformers import LlamaConfig

    from sparse_recover import plan

    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = validate_pipeline({"model": {"model": "m", "device": "cpu", "dtype": "float32"},
                             "calib": {"source": "wiki-en", "nsamples": 8, "seqlen": 128},
                             "prune": {"method": "sparsegpt", "pattern": "2:4"},
                             "eval": {"stages": ["dense"], "tasks": ["ppl"], "ppl_data": "wiki-en", "seqlen": 128,
                                      "limit": 4, "batch_size": 1}})
    facts = plan.model_facts(config, "m")
    weights = facts.params * 4
    # resident at the peak, counted independently of plan.py: the float32 model, and for SparseGPT the
    # widest input's float32 Hessian (MLP down_proj: intermediate^2) and the calibration windows (int64);
    # for perplexity one window's float32 logits
    needs = {"prune": weights + 2816 ** 2 * 4 + 8 * 128 * 8, "eval": weights + 128 * 512 * 4}
    for on_gpu in (False, True):
        for e in plan.estimates(cfg, facts, ["prune", "eval"], on_gpu=on_gpu, source_label="m"):
            host = e.host - plan.RUNTIME_HOST
            # device: the tensors alone; host: plus the copies of the weights while a checkpoint loads
            assert needs[e.stage] <= e.device <= 2 * needs[e.stage], (e.stage, on_gpu, e.device / 2**20)
            assert needs[e.stage] <= host <= 4 * needs[e.stage], (e.stage, on_gpu, host / 2**20)


def test_make_table_without_runs_prints_published(tmp_path):
    out = subprocess.run([sys.executable, "scripts/make_table.py", "dsnot-1", "--runs", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| LLaMA-7B Wanda 60% | Wanda w. DSnoT | dsnot | 10.22 | - | - | - | verified |" in out.stdout


@pytest.mark.slow
def test_smoke_table_end_to_end(tmp_path):
    """`make table-dsnot-5 SMOKE=1`: every row on the tiny model, then the table with our numbers."""
    out = subprocess.run([sys.executable, "scripts/make_table.py", "dsnot-5", "--run", "--smoke", "--runs",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| LLaMA-7B")]
    assert len(rows) == 9 and all(line.split("|")[6].strip() != "-" for line in rows)  # ours: column 6


def test_smoke_table_model_unreachable_names_the_model(tmp_path):
    out = subprocess.run([sys.executable, "scripts/make_table.py", "lors-1", "--run", "--runs", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 3
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("make_table: 6 row(s) not run (table1-") for line in lines)
    for line, model in zip(lines, ("meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B")):  # one line per model
        assert (f"model {model} cannot be reached: it needs the Hugging Face hub (HF_HUB_OFFLINE=1 is set and it "
                "is not in the local cache)") in line


def test_tiny_alias_is_deterministic():
    import torch

    from sparse_recover.tiny import build_tiny_llama

    a, tok, _ = build_tiny_llama()
    b, _, _ = build_tiny_llama()
    assert len(tok) == a.config.vocab_size and a.config.num_hidden_layers == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_plan_offload_verdicts_on_a_gpu_from_config_alone(tmp_path, monkeypatch, capsys):
    """A 70B-shaped LLaMA (config.json only, no weights) on a pretend 80 GB GPU: prune needs --offload."""
    from transformers import LlamaConfig

    from sparse_recover import plan

    folder = tmp_path / "llama-70b-shape"
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096).save_pretrained(folder)
    monkeypatch.setattr(plan, "device_at_hand", lambda: ("pretend H100 (80 GiB)", 80 * plan.GIB, True))
    cfg = validate_pipeline({"model": {"model": str(folder)}, "calib": {"source": "c4"},
                             "prune": {"method": "sparsegpt", "pattern": "2:4"}, "dsnot": {"offload": True},
                             "eval": {"stages": ["prune"], "tasks": ["ppl"]}})
    out = plan.show(cfg, None, ["prune", "dsnot", "eval"])
    by = {s["stage"]: s for s in out["stages"]}
    assert 60e9 < out["model"]["params"] < 75e9
    assert by["prune"]["verdict"].startswith("needs --offload") and by["prune"]["offloaded"] < 80 * plan.GIB
    assert by["dsnot"]["verdict"] == "fits (with --offload)"
    assert by["eval"]["verdict"].startswith("does not fit")
    assert "needs --offload (prune.offload: true)" in capsys.readouterr().out

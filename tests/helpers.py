"""Helpers shared by test modules (fixtures live in conftest.py). Test modules import from here, never
from each other. Heavy imports (torch, transformers, the package's commands) stay inside functions, so
importing this module (conftest does) costs nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# tiny seeded models of several families, and a small BPE tokenizer trained on wiki-en text

FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")
VOCAB = 512


def corpus_lines(n: int = 400) -> list[str]:
    from sparse_recover.data import wiki_en_part

    return wiki_en_part("train")[:n]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make_config(family: str, vocab: int = VOCAB, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=512, word_embed_proj_dim=64, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, vocab_size=vocab,
                             bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def build_model(family: str, seed: int = 0, layers: int = 2):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, layers=layers), dtype=torch.float32)
    # Random init gives near-uniform weights; scale some rows so scores are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1 + torch.rand(p.shape[0], 1) * 3)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# the library's prune on a tiny model; quick fine-tune settings

SMALL_CALIB = {"nsamples": 3, "seqlen": 32}
QUICK = dict(seqlen=32, max_steps=4, batch_size=4, micro_batch_size=2, eval_every=4, save_every=2, val_size=8,
             max_train_samples=64, init_samples=8, lr=5e-3)


def prune(model_dir, run_dir, calib_file, method="wanda", pattern="2:4", sparsity=None, force=False, **extra):
    """The prune command on a tiny model with small calibration settings (the library call, no subprocess)."""
    from sparse_recover.commands import prune as prune_cmd
    from sparse_recover.config import PruneConfig, validate

    prune_extra = {k: v for k, v in extra.items() if k not in ("seed", "batch_size")}
    calib_extra = {k: v for k, v in extra.items() if k in ("seed", "batch_size")}
    cfg = validate(PruneConfig, {
        "model": {"model": str(model_dir), "device": "cpu"},
        "calib": {"source": str(calib_file), **SMALL_CALIB, **calib_extra},
        "prune": {"method": method, "pattern": pattern, "sparsity": sparsity, **prune_extra},
    })
    from sparse_recover.rundir import RunDir

    return prune_cmd.run(cfg, RunDir(run_dir), force=force)


# --------------------------------------------------------------------------------------------------
# the real CLI in a subprocess, and its one-line error contract

PREFIX = "sparse-recover: error:"
TIMEOUT_S = 180  # per subprocess; a hang (e.g. an endless window redraw) fails the case

# Runs `main()` with importlib.util.find_spec blind to some top-level packages, as if they were not
# installed: argv[1] = comma-separated package names, the rest = the CLI arguments.
HIDE_PACKAGES = """\
import importlib.util, sys
_find_spec = importlib.util.find_spec
_hidden = set(sys.argv[1].split(","))
def _blind(name, package=None):
    return None if name.split(".")[0] in _hidden else _find_spec(name, package)
importlib.util.find_spec = _blind
sys.argv = ["sparse-recover"] + sys.argv[2:]
from sparse_recover.cli import main
main()
"""


def _env(cache: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               SPARSE_RECOVER_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
               SPARSE_RECOVER_CACHE=str(cache),
               OMP_NUM_THREADS="1")  # tiny models: one thread is many times faster on a shared 2-core machine
    env.update(extra)
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool = False


def run_cli(args, cwd: Path, cache: Path, *, python_args=("-m", "sparse_recover"), env=None) -> Result:
    args = [str(a) for a in args]
    cmd = [sys.executable, *python_args, *args]
    start = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=cwd, env=_env(cache, env or {}), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Result(args, None, out, err, time.monotonic() - start, timed_out=True)
    return Result(args, res.returncode, res.stdout, res.stderr, time.monotonic() - start)


def snapshot(path: Path):
    """None if absent; else {relative path: ('dir',) | ('file', size, sha256)} for the whole tree."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir():
        return {".": ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())}
    tree = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            tree[os.path.relpath(os.path.join(root, d), path)] = ("dir",)
        for f in files:
            p = Path(root, f)
            tree[os.path.relpath(p, path)] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return tree


def stderr_lines(res: Result) -> list[str]:
    # tqdm redraws with '\r': treat it as a line break too
    return [line for line in re.split(r"[\r\n]+", res.stderr) if line.strip()]


def assert_clean_error(res: Result, exit_code: int, needles=(), strict_stderr: bool = True) -> str:
    """The contract: the documented non-zero exit code, no traceback, ONE `sparse-recover: error:`
    line, last on stderr, and (strict) nothing else on stderr. Returns the message."""
    where = (f"\n--- {' '.join(res.args)}\n--- rc={res.returncode} in {res.elapsed:.1f}s"
             f"\n--- stdout:\n{res.stdout[-3000:]}\n--- stderr:\n{res.stderr[-3000:]}")
    assert not res.timed_out, f"did not finish within {TIMEOUT_S}s" + where
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, "traceback printed" + where
    assert res.returncode != 0, "exit code 0 on bad input" + where
    assert res.returncode == exit_code, f"exit code {res.returncode}, expected {exit_code}" + where
    lines = stderr_lines(res)
    errors = [line for line in lines if line.startswith(PREFIX)]
    assert len(errors) == 1, f"expected exactly one '{PREFIX}' line" + where
    assert lines[-1] == errors[0], "the error line is not the last line on stderr" + where
    if strict_stderr:
        assert lines == errors, "stderr holds more than the one error line" + where
    message = errors[0][len(PREFIX):].strip()
    assert message, "empty error message" + where
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in the message {message!r}" + where
    return message


# --------------------------------------------------------------------------------------------------
# local lm-eval task files

BOOLQ_PROMPT = "{{passage}}\nQuestion: {{question}}?\nAnswer:"
ARC_PROMPT = "Question: {{question}}\nAnswer:"


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hand_written_tasks(data_dir: Path) -> list[dict]:
    return [
        {"task": "boolq_local", "dataset_path": "json",
         "dataset_kwargs": {"data_files": {"validation": str(data_dir / "boolq" / "validation.jsonl")}},
         "output_type": "multiple_choice", "validation_split": "validation", "doc_to_text": BOOLQ_PROMPT,
         "doc_to_target": "label", "doc_to_choice": ["no", "yes"], "metric_list": [{"metric": "acc"}]},
        {"task": "arc_local", "dataset_path": "json",
         "dataset_kwargs": {"data_files": {"test": str(data_dir / "arc_easy" / "test.jsonl")}},
         "output_type": "multiple_choice", "test_split": "test", "doc_to_text": ARC_PROMPT,
         "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
         "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    ]


def stock_lm_eval_cli(checkpoint: Path, data_dir: Path, tmp_path: Path) -> dict:
    """Results of the stock `lm_eval` command line (its legacy form: `lm_eval --model hf ...`) on a saved
    checkpoint, with the hand-written task YAMLs (boolq_local, arc_local) in an --include_path folder."""
    import yaml

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    for cfg in hand_written_tasks(data_dir):
        (tasks_dir / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={checkpoint},dtype=float32", "--tasks", "boolq_local,arc_local", "--include_path",
         str(tasks_dir), "--device", "cpu", "--batch_size", "1", "--num_fewshot", "0", "--output_path", str(out_dir)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_files = sorted(out_dir.rglob("results_*.json"))
    assert result_files, proc.stdout[-2000:]
    return json.loads(result_files[-1].read_text())["results"]


# --------------------------------------------------------------------------------------------------
# the stage commands called as a library, with keyword arguments mapped onto their typed configs


def run_dsnot(run_dir, *, force: bool = False, device: str = "auto", dtype: str = "auto", **settings):
    from sparse_recover.commands import dsnot
    from sparse_recover.config import DsnotConfig, validate
    from sparse_recover.rundir import RunDir

    cfg = validate(DsnotConfig, {"model": {"device": device, "dtype": dtype}, "dsnot": settings})
    return dsnot.run(cfg, RunDir(run_dir), force=force)


def run_eval(run_dir, stage: str, tasks: list[str], *, force: bool = False, device: str = "auto",
             dtype: str = "auto", **settings):
    from sparse_recover.commands import evaluate
    from sparse_recover.config import EvalCommandConfig, validate
    from sparse_recover.rundir import RunDir

    cfg = validate(EvalCommandConfig, {"model": {"device": device, "dtype": dtype}, "stage": stage,
                                            "eval": {"tasks": tasks, **settings}})
    return evaluate.run(cfg, RunDir(run_dir), force=force)


def run_audit(run_dir, stages: list[str] | None = None):
    from sparse_recover.commands import audit
    from sparse_recover.config import AuditConfig, validate
    from sparse_recover.rundir import RunDir

    return audit.run(validate(AuditConfig, {"audit": {"stages": stages}}), RunDir(run_dir))


def run_finetune(section, run_dir, *, device: str = "auto", dtype: str = "auto", resume: bool = False,
                 force: bool = False):
    from sparse_recover.commands import finetune
    from sparse_recover.config import FinetuneConfig, RuntimeSection
    from sparse_recover.rundir import RunDir

    cfg = FinetuneConfig(model=RuntimeSection(device=device, dtype=dtype), finetune=section, resume=resume)
    return finetune.run(cfg, RunDir(run_dir), force=force)


def run_merge(run_dir, *, force: bool = False, device: str = "auto", dtype: str = "auto", **settings):
    from sparse_recover.commands import merge
    from sparse_recover.config import MergeConfig, validate
    from sparse_recover.rundir import RunDir

    cfg = validate(MergeConfig, {"model": {"device": device, "dtype": dtype}, "merge": settings})
    return merge.run(cfg, RunDir(run_dir), force=force)


def run_report(runs: list[str], *, fmt: str = "md", plot_path: str | None = None, output: str | None = None):
    from sparse_recover.commands import report
    from sparse_recover.config import ReportConfig

    return report.run(ReportConfig(runs=runs, format=fmt, plot=plot_path, output=output))


def run_pipeline(cfg, run_dir, *, from_stage: str | None = None, until_stage: str | None = None,
                 force: bool = False, dry_run: bool = False):
    from sparse_recover.commands import run
    from sparse_recover.config import RunConfig
    from sparse_recover.rundir import RunDir

    rc = RunConfig(pipeline=cfg, from_stage=from_stage, until=until_stage, dry_run=dry_run)
    return run.run(rc, None if run_dir is None else RunDir(run_dir), force=force)


def accelerate_finetune(args, run_dir, cwd, processes: int = 2, config_file: str | Path | None = None,
                        env: dict[str, str] | None = None):
    """`accelerate launch` of the finetune command on `processes` CPU processes (gloo); returns the result.
    config_file: launch with a shipped accelerate config (its process count and precision overridden)."""
    import os as _os

    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**_os.environ, "OMP_NUM_THREADS": "1", "SPARSE_RECOVER_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **(env or {})}
    launcher = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    return subprocess.run([str(accelerate), "launch", *launcher, "--num_processes", str(processes),
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                           "sparse_recover", "finetune", *map(str, args), "--run-dir", str(run_dir)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a shared run directory fixture."""
    import shutil

    shutil.copytree(src, dst)
    return dst

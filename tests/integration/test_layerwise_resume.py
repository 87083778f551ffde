"""Resumable layer-wise passes (issue 12): `prune` and `dsnot` snapshot their progress every K decoder blocks
in RUN/.<stage>.partial, and the same command re-run after a SIGKILL continues at the next block with a
result bit-identical to an uninterrupted run (masks, weights, manifest per-layer stats).

The kills are real: the CLI runs in a subprocess with SPARSE_RECOVER_KILL_AFTER_BLOCK=N, which SIGKILLs the
process once N blocks (and their snapshot) are done. The model is a seeded tiny LLaMA with 4 blocks; the
uninterrupted references are computed in-process with the library (one intra-op thread, like the CLI runs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_recover.errors import RunDirError
from sparse_recover.sparsity.io import load_masks
from tests.helpers import Result, assert_clean_error, build_model, copy_run, prune, run_cli, run_dsnot, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = 4
KILL = "SPARSE_RECOVER_KILL_AFTER_BLOCK"
SIGKILLED = -9  # subprocess returncode of a process ended by SIGKILL


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("llama4") / "model"
    build_model("llama", layers=BLOCKS).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def _prune_args(model: Path, calib: Path, run: Path, *extra) -> list:
    # the settings of helpers.prune (SMALL_CALIB, CPU), so the library reference is the same computation
    return ["prune", "--run-dir", run, "--model", model, "--method", "sparsegpt", "--pattern", "unstructured",
            "--sparsity", "0.5", "--calib", calib, "--nsamples", "3", "--seqlen", "32", "--device", "cpu", *extra]


DSNOT = ["--targets", "all", "--device", "cpu"]


@pytest.fixture(scope="module")
def references(llama4, calib_file, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: a SparseGPT prune, and a DSnoT (all linears) on a copy of it."""
    root = tmp_path_factory.mktemp("reference")
    pruned = root / "pruned"
    prune(llama4, pruned, calib_file, "sparsegpt", "unstructured", 0.5)
    refined = copy_run(pruned, root / "refined")
    run_dsnot(refined, device="cpu", targets="all")
    return {"prune": pruned, "dsnot": refined}


@pytest.fixture(scope="module")
def killed_prune(llama4, calib_file, tmp_path_factory) -> Path:
    """A prune with --checkpoint-every 2, SIGKILLed after block 2: only its snapshot is on disk."""
    cwd = tmp_path_factory.mktemp("killed-prune")
    run = cwd / "RUN"
    res = run_cli(_prune_args(llama4, calib_file, run, "--checkpoint-every", "2"), cwd, cwd / "cache",
                  env={KILL: "2"})
    assert res.returncode == SIGKILLED, _where(res)
    assert not (run / "prune").exists() and not (run / "manifest.json").exists(), sorted(p.name for p in run.iterdir())
    assert sorted(p.name for p in (run / ".prune.partial").glob("state-*.json")) == ["state-00002.json"]
    return run


@pytest.fixture(scope="module")
def killed_dsnot(references, tmp_path_factory) -> Path:
    """DSnoT with --checkpoint-every 1 on the reference prune, SIGKILLed after block 3: two generations kept."""
    cwd = tmp_path_factory.mktemp("killed-dsnot")
    run = copy_run(references["prune"], cwd / "RUN")
    res = run_cli(["dsnot", "--run-dir", run, *DSNOT, "--checkpoint-every", "1"], cwd, cwd / "cache", env={KILL: "3"})
    assert res.returncode == SIGKILLED, _where(res)
    assert not (run / "dsnot").exists()
    states = sorted(p.name for p in (run / ".dsnot.partial").glob("state-*.json"))
    assert states == ["state-00002.json", "state-00003.json"], states
    return run


def _cli_in_process(args: list, capsys) -> Result:
    """The CLI's `main` in this process (no new interpreter): exit code, stdout, stderr."""
    from sparse_recover.cli import main

    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return Result([str(a) for a in args], code, captured.out, captured.err, 0.0)


def _where(res: Result) -> str:
    return f"\n--- rc={res.returncode}\n--- stdout:\n{res.stdout[-2000:]}\n--- stderr:\n{res.stderr[-3000:]}"


def assert_same_stage(run: Path, reference: Path, stage: str) -> None:
    """Masks, checkpoint tensors and manifest per-layer stats equal the reference bit for bit."""
    got, _ = load_masks(run / stage / "masks.safetensors")
    want, _ = load_masks(reference / stage / "masks.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"mask {key} differs"
    a, b = load_file(str(run / stage / "model.safetensors")), load_file(str(reference / stage / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"weight {key} differs"
    mine = json.loads((run / "manifest.json").read_text())["stages"][stage]
    theirs = json.loads((reference / "manifest.json").read_text())["stages"][stage]
    assert json.dumps(mine["sparsity"]["layers"]) == json.dumps(theirs["sparsity"]["layers"])
    assert mine["masks_sha256"] == theirs["masks_sha256"]
    assert mine["status"] == "complete"
    assert not (run / f".{stage}.partial").exists(), "the snapshot outlived the committed stage"


# --------------------------------------------------------------------------------------------------
# kill after block 2, re-run: bit-identical


def test_sparsegpt_prune_killed_after_block_2_resumes_bit_identical(killed_prune, llama4, calib_file, references,
                                                                   tmp_path, capsys):
    run = copy_run(killed_prune, tmp_path / "RUN")
    res = _cli_in_process(_prune_args(llama4, calib_file, run, "--checkpoint-every", "2"), capsys)
    assert res.returncode == 0, _where(res)
    resumed = [line for line in res.stdout.splitlines() if "resuming" in line]
    assert resumed == [f"prune: resuming at block 3 of 4 (snapshot in {run / '.prune.partial'})"], _where(res)
    assert_same_stage(run, references["prune"], "prune")
    entry = json.loads((run / "manifest.json").read_text())["stages"]["prune"]
    assert entry["resumed_at_block"] == 3


def test_dsnot_killed_after_block_2_resumes_bit_identical(references, tmp_path, capsys):
    run = copy_run(references["prune"], tmp_path / "RUN")
    res = run_cli(["dsnot", "--run-dir", run, *DSNOT, "--checkpoint-every", "2"], tmp_path, tmp_path / "cache",
                  env={KILL: "2"})
    assert res.returncode == SIGKILLED, _where(res)
    capsys.readouterr()
    run_dsnot(run, device="cpu", targets="all", checkpoint_every=2)  # the same command, in-process
    assert f"dsnot: resuming at block 3 of 4 (snapshot in {run / '.dsnot.partial'})" in capsys.readouterr().out
    assert_same_stage(run, references["dsnot"], "dsnot")


# --------------------------------------------------------------------------------------------------
# damaged snapshots are treated as absent


def test_damaged_newest_snapshot_resumes_from_the_one_before(killed_dsnot, references, tmp_path, capsys):
    run = copy_run(killed_dsnot, tmp_path / "RUN")
    acts = run / ".dsnot.partial" / "acts-00003.safetensors"
    size = acts.stat().st_size
    acts.write_bytes(acts.read_bytes()[:100])  # truncated
    run_dsnot(run, device="cpu", targets="all")  # checkpoint_every may differ: it changes no result
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("dsnot: the snapshot")]
    assert lines == [f"dsnot: the snapshot after block 3 is damaged (acts-00003.safetensors is truncated (100 of "
                     f"{size} bytes)): resuming at block 3 of 4 from the one after block 2"], out
    assert "resuming at block" not in out.replace(lines[0], "")  # one line, not two
    assert_same_stage(run, references["dsnot"], "dsnot")


def test_snapshot_damaged_throughout_starts_from_the_first_block(killed_dsnot, references, tmp_path, capsys):
    run = copy_run(killed_dsnot, tmp_path / "RUN")
    partial = run / ".dsnot.partial"
    (partial / "state-00003.json").write_text('{"format": "sparse-recover-layerw', encoding="utf-8")  # cut short
    block = partial / "block-00001.safetensors"  # named by the older generation: a flipped byte
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    run_dsnot(run, device="cpu", targets="all")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("dsnot: ")]
    assert lines[0] == (f"dsnot: the snapshot in {partial} is damaged (state-00003.json unreadable): starting from "
                        "block 1 of 4"), out
    assert not any("resuming" in line for line in lines), out
    assert_same_stage(run, references["dsnot"], "dsnot")


# --------------------------------------------------------------------------------------------------
# a changed config refuses to resume; nothing is deleted


def test_prune_with_changed_config_refuses_to_resume_and_keeps_the_snapshot(killed_prune, llama4, calib_file,
                                                                             tmp_path, capsys):
    run = copy_run(killed_prune, tmp_path / "RUN")
    before = snapshot(run)
    args = _prune_args(llama4, calib_file, run, "--checkpoint-every", "3", "--calib-batch-size", "2")
    args[args.index("0.5")] = "0.6"
    res = _cli_in_process(args, capsys)
    message = assert_clean_error(res, RunDirError.exit_code, ["interrupted run", "2 of 4 blocks",
                                                              "prune.sparsity: 0.5 -> 0.6", ".prune.partial"])
    assert "checkpoint_every" not in message and "batch_size" not in message and "--force" in message
    assert snapshot(run) == before
    # --force starts over with the new settings: the snapshot is dropped, the stage completes
    res = _cli_in_process([*args, "--force"], capsys)
    assert res.returncode == 0, res.stderr
    assert not (run / ".prune.partial").exists()
    assert json.loads((run / "manifest.json").read_text())["stages"]["prune"]["config"]["prune"]["sparsity"] == 0.6


def test_dsnot_with_changed_config_refuses_and_an_ignored_setting_does_not(killed_dsnot, tmp_path):
    run = copy_run(killed_dsnot, tmp_path / "RUN")
    before = snapshot(run)
    with pytest.raises(RunDirError) as exc:
        run_dsnot(run, device="cpu", targets="all", max_cycles=3, checkpoint_every=5, offload=True)
    msg = str(exc.value)
    assert "max_cycles: 50 -> 3" in msg and "3 of 4 blocks done" in msg, msg
    assert "checkpoint_every" not in msg and "offload" not in msg, msg
    assert snapshot(run) == before


def test_a_redone_prune_makes_the_dsnot_snapshot_obsolete(killed_dsnot, llama4, calib_file, tmp_path, capsys):
    """The snapshot was computed from the previous prune stage: dropped with one line, DSnoT starts over."""
    run = copy_run(killed_dsnot, tmp_path / "RUN")
    prune(llama4, run, calib_file, "sparsegpt", "unstructured", 0.6, force=True)
    capsys.readouterr()
    entry = run_dsnot(run, device="cpu", targets="all", max_cycles=10)  # other settings: no refusal either
    out = capsys.readouterr().out
    assert (f"dsnot: the snapshot in {run / '.dsnot.partial'} was computed from other inputs (prune): starting "
            "from block 1 of 4") in out, out
    assert "resumed_at_block" not in entry and entry["sparsity"]["overall"] == pytest.approx(0.6, abs=1e-3)
    assert not (run / ".dsnot.partial").exists()


def test_a_leftover_snapshot_of_a_committed_stage_is_dropped(killed_prune, references, llama4, calib_file,
                                                              tmp_path, capsys):
    """A kill between the commit and the clean-up leaves a snapshot older than the stage's record: a forced
    redo with other settings neither refuses nor resumes from it."""
    run = copy_run(references["prune"], tmp_path / "RUN")
    shutil.copytree(killed_prune / ".prune.partial", run / ".prune.partial")
    capsys.readouterr()
    entry = prune(llama4, run, calib_file, "sparsegpt", "unstructured", 0.6, force=True)
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if "resuming" in line or line.startswith("prune: the snapshot")]
    assert entry["sparsity"]["overall"] == pytest.approx(0.6, abs=1e-3) and "resumed_at_block" not in entry
    assert not (run / ".prune.partial").exists()


# --------------------------------------------------------------------------------------------------
# bad --checkpoint-every values: one line, exit 2, nothing written


@pytest.mark.parametrize("value", ["0", "-3"])
def test_checkpoint_every_must_be_positive(value, llama4, calib_file, references, tmp_path, capsys):
    run = tmp_path / "RUN"
    res = _cli_in_process(_prune_args(llama4, calib_file, run, "--checkpoint-every", value), capsys)
    assert_clean_error(res, 2, ["--checkpoint-every", "at least 1"])
    assert not run.exists()
    refined = copy_run(references["prune"], tmp_path / "PRUNED")
    before = snapshot(refined)
    res = _cli_in_process(["dsnot", "--run-dir", refined, *DSNOT, "--checkpoint-every", value], capsys)
    assert_clean_error(res, 2, ["--checkpoint-every", "greater than or equal to 1"])
    assert snapshot(refined) == before


def test_checkpoint_every_is_not_a_setting_of_the_result(references, tmp_path, capsys):
    """A completed stage re-run with another cadence is the usual no-op (the guard ignores the key)."""
    run = copy_run(references["dsnot"], tmp_path / "RUN")
    before = snapshot(run)
    run_dsnot(run, device="cpu", targets="all", checkpoint_every=3)
    assert "already complete" in capsys.readouterr().out
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------------
# the automatic cadence and the dry-run's disk figure


def test_automatic_cadence_rule():
    from sparse_recover.engine.snapshot import auto_checkpoint_every

    tokens = 128 * 2048
    assert auto_checkpoint_every(69_000_000_000, 856_000_000, tokens) == 10  # a 70B LLaMA: ~every 10 minutes
    assert auto_checkpoint_every(999_999_999, 30_000_000, tokens) is None  # under 1B: off
    assert auto_checkpoint_every(7_000_000_000, 202_000_000, tokens) == 42  # more than its 32 blocks: none taken
    assert auto_checkpoint_every(69_000_000_000, 856_000_000, 0) is None  # data-free (magnitude): off
    assert auto_checkpoint_every(69_000_000_000, 856_000_000, 16 * tokens) == 1


def test_dry_run_prints_the_snapshot_disk_cost(llama4, calib_file, tmp_path):
    from sparse_recover.config import validate_pipeline
    from sparse_recover.plan import GIB, ModelFacts, estimates

    cfg = validate_pipeline({"model": {"model": str(llama4)}, "calib": {"nsamples": 128, "seqlen": 2048},
                             "prune": {"method": "sparsegpt", "pattern": "2:4"}, "dsnot": {"checkpoint_every": 4}})
    # a 70B LLaMA's shapes (80 blocks, hidden 8192)
    linears = [("self_attn.q_proj", 8192, 8192), ("self_attn.k_proj", 1024, 8192), ("self_attn.v_proj", 1024, 8192),
               ("self_attn.o_proj", 8192, 8192), ("mlp.gate_proj", 28672, 8192), ("mlp.up_proj", 28672, 8192),
               ("mlp.down_proj", 8192, 28672)]
    block = sum(o * i for _, o, i in linears) + 2 * 8192
    facts = ModelFacts(name="llama-70b", architecture="LlamaForCausalLM", params=80 * block + 2 * 32000 * 8192 + 8192,
                       block_params=block, n_blocks=80, hidden=8192, intermediate=28672, vocab=32000, heads=64,
                       outside_blocks=2 * 32000 * 8192 + 8192, linears=linears, input_groups=[8192, 8192, 8192, 28672])
    rows = {e.stage: e for e in estimates(cfg, facts, ["prune", "dsnot"], on_gpu=True, source_label="llama-70b")}
    prune_snap, dsnot_snap = rows["prune"].snapshot, rows["dsnot"].snapshot
    assert prune_snap["every"] == 10 and prune_snap["auto"]
    acts = 128 * 2048 * 8192 * 2  # nsamples x seqlen x hidden in bfloat16
    assert prune_snap["parts"]["activations"] == 2 * acts  # the two generations kept
    assert prune_snap["parts"]["weights"] == 70 * block * 2  # blocks written before the last generation
    assert dsnot_snap["every"] == 4 and not dsnot_snap["auto"] and dsnot_snap["parts"]["weights"] == 76 * block * 2
    assert 100 * GIB < prune_snap["bytes"] < 200 * GIB


@pytest.mark.slow
def test_run_yaml_resumes_prune_then_dsnot_bit_identical(llama4, calib_file, tmp_path):
    """`run` on a YAML: killed in prune after block 2, re-run (killed again, now in dsnot after block 2),
    re-run: both stages equal an uninterrupted pipeline's."""
    import yaml

    from tests.helpers import run_pipeline

    from sparse_recover.config import validate_pipeline

    data = {"model": {"model": str(llama4), "device": "cpu"},
            "calib": {"source": str(calib_file), "nsamples": 3, "seqlen": 32},
            "prune": {"method": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5, "checkpoint_every": 2},
            "dsnot": {"targets": "all", "checkpoint_every": 1}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    reference = tmp_path / "REF"
    run_pipeline(validate_pipeline(data), reference, until_stage="dsnot")
    run = tmp_path / "RUN"
    args = ["run", config, "--run-dir", run, "--until", "dsnot"]
    first = run_cli(args, tmp_path, tmp_path / "cache", env={KILL: "2"})
    assert first.returncode == SIGKILLED and (run / ".prune.partial").is_dir(), _where(first)
    second = run_cli(args, tmp_path, tmp_path / "cache", env={KILL: "2"})
    assert second.returncode == SIGKILLED, _where(second)
    assert "prune: resuming at block 3 of 4" in second.stdout, _where(second)
    assert (run / "prune").is_dir() and (run / ".dsnot.partial").is_dir() and not (run / "dsnot").exists()
    third = run_cli(args, tmp_path, tmp_path / "cache")
    assert third.returncode == 0, _where(third)
    assert "dsnot: resuming at block 3 of 4" in third.stdout, _where(third)
    assert_same_stage(run, reference, "prune")
    assert_same_stage(run, reference, "dsnot")
    shutil.rmtree(reference)


# --------------------------------------------------------------------------------------------------
# the engine alone: dense propagation, batches, an exception mid-pass (no subprocess)


@pytest.mark.parametrize("propagate", ["pruned", "dense"])
def test_engine_resume_after_a_failure_matches_the_uninterrupted_pass(propagate, tmp_path):
    """prune_model with Wanda 2:4 over 2-window batches, interrupted by an exception after block 2: the
    snapshot survives it, and a fresh dense model resumed from it ends equal to the uninterrupted pass."""
    import copy

    from sparse_recover.engine.prune import prune_model
    from sparse_recover.engine.snapshot import BlockRecorder, LayerwiseSnapshot
    from sparse_recover.pruning import PruneSettings, get_method
    from sparse_recover.rundir import RunDir
    from sparse_recover.sparsity.patterns import parse_pattern

    dense = build_model("llama", layers=BLOCKS)
    windows = torch.randint(3, 500, (5, 16), generator=torch.Generator().manual_seed(0))
    method, settings = get_method("wanda"), PruneSettings(pattern=parse_pattern("2:4"))
    kw = dict(device=torch.device("cpu"), batch_size=2, propagate=propagate, show_progress=False)
    reference = copy.deepcopy(dense)
    want_masks, want_layers, _ = prune_model(reference, method, settings, windows, **kw)

    class Failure(Exception):
        pass

    snap = LayerwiseSnapshot(RunDir(tmp_path / "RUN"), "prune", settings={"x": 1}, engine={}, inputs={}, every=2)
    recorder = BlockRecorder(snap, BLOCKS, "model.layers")

    def fail_after_block_2(i, *args):
        recorder(i, *args)
        if i == 1:
            raise Failure

    with pytest.raises(Failure):
        prune_model(copy.deepcopy(dense), method, settings, windows, after_block=fail_after_block_2, **kw)
    assert (tmp_path / "RUN" / ".prune.partial" / "state-00002.json").is_file()

    resumed = copy.deepcopy(dense)
    again = LayerwiseSnapshot(RunDir(tmp_path / "RUN"), "prune", settings={"x": 1}, engine={}, inputs={},
                              echo=lambda line: None)
    resume = again.restore(resumed, again.find(BLOCKS))
    assert resume.start == 2 and resume.hidden.shape == (5, 16, 64)
    masks, layers, _ = prune_model(resumed, method, settings, windows, resume=resume, **kw)
    assert list(layers) == list(want_layers) and json.dumps(layers) == json.dumps(want_layers)
    assert all(torch.equal(masks[k], want_masks[k]) for k in want_masks) and masks.keys() == want_masks.keys()
    for (k, v), (k2, v2) in zip(resumed.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k

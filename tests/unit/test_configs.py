"""Every shipped pipeline YAML validates; bad YAML reports every problem at once, with dotted paths."""

from pathlib import Path

import pytest

from sparse_recover.config import (PipelineConfig, apply_overrides, load_yaml, validate_pipeline, yaml_load)
from sparse_recover.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
NOT_PIPELINES = {"published.yaml", "smoke.yaml"}
PIPELINES = sorted(p for p in CONFIGS.rglob("*.yaml")
                   if p.name not in NOT_PIPELINES and "accelerate" not in p.parts)


def test_there_are_shipped_configs():
    names = {p.relative_to(CONFIGS).as_posix() for p in PIPELINES}
    assert "demo.yaml" in names
    for paper in ("spp", "dsnot", "lors"):
        assert any(n.startswith(f"papers/{paper}/") for n in names)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_config_validates(path):
    cfg = validate_pipeline(load_yaml(str(path)))
    assert cfg.stages()[0] == "prune" and "audit" in cfg.stages()
    assert all(s in ("dense", *cfg.checkpoint_stages()) for s in cfg.eval_stages())


@pytest.mark.parametrize("path", [p for p in PIPELINES if "papers" in p.parts],
                         ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_paper_config_validates_with_the_smoke_overlay(path):
    import json

    overlay = load_yaml(str(CONFIGS / "papers" / "smoke.yaml"))
    data = load_yaml(str(path))
    sets = [f"{sec}.{k}={json.dumps(v)}" for sec, vals in overlay.items() if data.get(sec) is not None
            for k, v in vals.items()]
    cfg = validate_pipeline(apply_overrides(data, sets))
    assert cfg.model.model == "tiny-llama-random" and cfg.calib.nsamples == 4


def test_published_tables_name_existing_configs_and_sources():
    for paper in ("spp", "dsnot", "lors"):
        data = load_yaml(str(CONFIGS / "papers" / paper / "published.yaml"))
        assert data["paper"] and data["tables"]
        for table in data["tables"].values():
            ids = [row["id"] for row in table["rows"]]
            assert len(ids) == len(set(ids))
            for row in table["rows"]:
                assert (CONFIGS / "papers" / paper / row["config"]).is_file(), row["config"]
                for cell in row["cells"]:
                    assert cell["stage"] in ("dense", "prune", "dsnot", "merge")
                    assert cell["metric"] in ("ppl", "zeroshot_avg", "mmlu")
                    if cell["published"] is not None:  # a number always says where the paper prints it
                        assert cell["status"] == "verified" and cell["source"]
                    else:
                        assert cell["status"] and cell["reason"]


def test_reference_hyperparameters_pinned():
    """Protocol knobs that change published numbers (algorithms.md sections 3-7)."""
    def cfg(rel):
        return validate_pipeline(load_yaml(str(CONFIGS / "papers" / rel)))

    ds = cfg("dsnot/table1-llama2-7b-wanda-60.yaml")
    assert (ds.calib.source, ds.calib.nsamples, ds.calib.seqlen, ds.calib.seed) == ("c4", 128, 2048, 0)
    assert ds.prune.sparsity == 0.6 and ds.eval.seqlen == 2048  # DSnoT hard-codes 2048, also for LLaMA-2
    assert (ds.dsnot.targets, ds.dsnot.sign_check, ds.dsnot.max_cycles, ds.dsnot.threshold) == ("attn", False, 50, 0.1)
    assert cfg("dsnot/table1-llama-7b-sparsegpt-60.yaml").dsnot.init is None  # -> stored after SparseGPT
    spp = cfg("spp/table2-llama7b-wanda-2of4.yaml").finetune.resolved()
    assert (spp["lr"], spp["scaling"], spp["dropout"], spp["rank"], spp["epochs"], spp["batch_size"]) == \
        (4e-3, 2.0, 0.05, 16, 3, 128)
    assert cfg("spp/table3-llama7b-wanda-2of8.yaml").prune.parsed_pattern().sparsity == 0.75  # keep 2 of 8
    assert cfg("spp/table2-llama7b-wanda-2of4.yaml").finetune.data == "alpaca"  # SPP p. 6: Stanford-Alpaca
    # LoRS Sec. 3.1: Alpaca (Table 1) at batch 32 samples, SlimPajama (Table 4) at 256,000 tokens, lr 2e-5 for all
    lors = cfg("lors/table1-llama2-7b-sparsegpt-2of4-lors.yaml").finetune.resolved()
    assert (lors["data"], lors["lr"], lors["min_lr"], lors["scaling"], lors["seqlen"], lors["batch_size"],
            lors["scheduler"]) == ("alpaca", 2e-5, 1e-6, 4.0, 512, 32, "cosine")
    slim = cfg("lors/table4-llama3-8b-sparsegpt-2of4-lors.yaml").finetune.resolved()
    assert (slim["data"], slim["seqlen"], slim["batch_size"], slim["max_train_samples"], slim["lr"]) == \
        ("slimpajama", 2048, 125, 244140, 2e-5)
    lspp = cfg("lors/table1-llama3-8b-sparsegpt-2of4-spp.yaml").finetune.resolved()
    assert (lspp["scaling"], lspp["lr"], lspp["batch_size"]) == (1.0, 2e-5, 32)  # the paper's lr, not the script's 1e-3


def test_defaults_and_sections():
    cfg = validate_pipeline({"model": {"model": "m"}, "prune": {"pattern": "2:4"}})
    assert cfg.stages() == ["prune", "audit"] and cfg.eval_stages() == []
    cfg = validate_pipeline({"model": {"model": "m"}, "prune": {"sparsity": 0.5}, "dsnot": {}, "finetune": {}, "merge": {},
                             "eval": {}})
    assert cfg.stages() == ["prune", "dsnot", "finetune", "merge", "audit", "eval"]
    assert cfg.eval_stages() == ["dense", "prune", "dsnot", "merge"]
    off = validate_pipeline({"model": {"model": "m"}, "prune": {"sparsity": 0.5}, "dsnot": {"enabled": False}, "audit": {"enabled": False}})
    assert off.stages() == ["prune"]
    assert isinstance(cfg, PipelineConfig)


def test_bad_yaml_reports_every_problem_with_paths():
    data = yaml_load("""
model: {model: m, colour: red}
calib: {nsamples: many}
prune: {method: wanda, pattern: "2:4"}
dsnot: {init: recompute, max_cycles: -1, targets: ffn}
merge: {}
eval: {stages: [dense, dsnot, merge, finetune], seqlen: 1, batch_size: big}
""")
    with pytest.raises(ConfigError) as exc:
        validate_pipeline(data)
    msg = str(exc.value)
    assert msg.count("\n") == 0
    for path in ("model.colour: unknown key", "calib.nsamples", "dsnot.max_cycles", "dsnot.targets", "eval.seqlen",
                 "eval.batch_size", "eval.stages: cannot evaluate 'finetune'", "merge: merge needs a finetune"):
        assert path in msg, path


def test_contradictions_reported_together():
    data = {"model": {"model": "m"}, "prune": {"method": "sparsegpt", "pattern": "2:4"},
            "dsnot": {"init": "recompute"}, "finetune": {"from_stage": "prune"}, "merge": {"enabled": True},
            "eval": {"stages": ["dsnot", "merge"]}}
    validate_pipeline({**data, "dsnot": {}})  # stored init after SparseGPT is fine
    with pytest.raises(ConfigError, match=r"dsnot.init: recompute cannot rebuild a sparsegpt mask"):
        validate_pipeline(data)
    data = {"model": {"model": "m"}, "prune": {"sparsity": 0.5}, "dsnot": {"enabled": False}, "finetune": {"from_stage": "dsnot"},
            "eval": {"stages": ["dsnot", "merge"]}}
    with pytest.raises(ConfigError) as exc:
        validate_pipeline(data)
    msg = str(exc.value)
    assert "finetune.from_stage: dsnot, but the pipeline has no dsnot stage" in msg
    assert "eval.stages.0: the pipeline never produces a dsnot stage" in msg
    assert "eval.stages.1: the pipeline never produces a merge stage" in msg


def test_set_overrides_layer_on_top_and_can_drop_a_section():
    data = load_yaml(str(CONFIGS / "demo.yaml"))
    cfg = validate_pipeline(apply_overrides(data, ["prune.pattern=4:8", "finetune=", "merge.enabled=false",
                                                   "eval.stages=[dense, prune, dsnot]"]))
    assert cfg.prune.pattern == "4:8" and cfg.finetune is None and not cfg.enabled("merge")
    assert cfg.stages() == ["prune", "dsnot", "audit", "eval"]
    with pytest.raises(ConfigError, match="merge: merge needs a finetune"):
        validate_pipeline(apply_overrides(load_yaml(str(CONFIGS / "demo.yaml")), ["finetune="]))

"""The hub reachability probe (sparse_recover/hub.py): no network means offline at once, not 25 s of retries."""

import os
import socket
import subprocess
import sys

from pathlib import Path

from sparse_recover import hub

ROOT = Path(__file__).resolve().parents[2]

NO_HUB = "http://sparse-recover-test.invalid"  # .invalid never resolves (RFC 2606)


def _clean_env(monkeypatch):
    for var in (*hub.OFFLINE_VARS, "TRANSFORMERS_OFFLINE", *hub.PROXY_VARS, hub.PROBE_ENV):
        monkeypatch.setenv(var, "")  # recorded, so what the probe sets is undone after the test
        monkeypatch.delenv(var)
    hub._probe.cache_clear()
    hub._went_offline.clear()


def test_probe_answers_for_a_listening_and_a_closed_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert hub._probe(f"http://127.0.0.1:{port}") is None
    finally:
        server.close()
    hub._probe.cache_clear()
    reason = hub._probe(f"http://127.0.0.1:{port}")  # nothing listens there now
    assert reason is not None and reason.startswith("127.0.0.1 cannot be reached")


def test_offline_variable_proxy_and_opt_out(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", NO_HUB)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.unreachable() == "HF_DATASETS_OFFLINE=1 is set"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # a proxy may reach what a socket cannot
    assert hub.unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv(hub.PROBE_ENV, "0")
    assert hub.unreachable() is None


def test_failed_probe_puts_the_libraries_offline(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", NO_HUB)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reason = hub.unreachable()
    assert reason is not None and "sparse-recover-test.invalid" in reason
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert hub.unreachable() == reason  # the reason stays the probe's, not the variable it set
    hub._went_offline.clear()


def test_hub_model_without_network_fails_fast_without_retries(tmp_path):
    """No HF_HUB_OFFLINE, no network: `run --dry-run` of a hub model plans from the built-in shape table and `run`
    refuses in one line; neither prints the libraries' "Retrying in ..." lines."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*hub.OFFLINE_VARS, "TRANSFORMERS_OFFLINE", *hub.PROXY_VARS, hub.PROBE_ENV)}
    env.update(HF_ENDPOINT=NO_HUB, HF_HOME=str(tmp_path / "hf"), SPARSE_RECOVER_NO_PROGRESS="1")
    config = ROOT / "configs" / "papers" / "spp" / "table7-llama2-70b-wanda-2of4.yaml"
    cli = [sys.executable, "-m", "sparse_recover"]
    plan = subprocess.run([*cli, "run", str(config), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert plan.returncode == 0, plan.stderr
    assert "Retrying" not in plan.stdout + plan.stderr
    assert "shape from the built-in table" in plan.stdout + plan.stderr
    assert "sparse-recover-test.invalid cannot be reached" in plan.stdout + plan.stderr
    real = subprocess.run([*cli, "run", str(config), "--run-dir", str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert real.returncode != 0
    assert "Retrying" not in real.stdout + real.stderr and "Traceback" not in real.stderr
    assert "meta-llama/Llama-2-70b-hf cannot be reached" in real.stderr
    assert not (tmp_path / "run").exists()

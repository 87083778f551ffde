"""Whether the Hugging Face hub can be used, decided once per process and in seconds.

Without a network and without HF_HUB_OFFLINE, every `from_pretrained` or `load_dataset` of a hub name
retries five times with backoff (about 25 s of "Retrying in 8s" lines) before failing. `unreachable()`
answers first: an offline variable that is set, or one TCP connection to the hub's endpoint (HF_ENDPOINT,
default huggingface.co:443) that fails within PROBE_TIMEOUT_S. When the probe fails, the process switches
huggingface_hub, transformers and datasets to offline mode, so every later load answers from the local
cache at once: a cached model still loads, a missing one is one line.

No probe is made when a proxy variable is set (the direct connection would fail while the proxy works) or
when SPARSE_RECOVER_HUB_PROBE=0; the libraries then behave as they always do.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
PROBE_ENV = "SPARSE_RECOVER_HUB_PROBE"
PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def offline_flag() -> str | None:
    """The environment variable that keeps the Hugging Face hub offline, if one is set."""
    return next((v for v in OFFLINE_VARS if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")),
                None)


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    host = url.hostname
    if not host:
        return None  # not a URL we can probe: leave it to the libraries
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except socket.timeout:
        return f"{host} did not answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__})"


_went_offline: list[str] = []  # the failed probe's reason, once this process has switched the libraries offline


def _go_offline(reason: str) -> None:
    _went_offline[:] = [reason]
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(config, name):
                setattr(config, name, True)


def unreachable() -> str | None:
    """None when the hub may be used; otherwise why not, as a phrase ("HF_HUB_OFFLINE=1 is set",
    "huggingface.co cannot be reached (...)"). A failed probe also puts the HF libraries offline."""
    if _went_offline:
        return _went_offline[0]
    flag = offline_flag()
    if flag is not None:
        return f"{flag}=1 is set"
    if os.environ.get(PROBE_ENV, "").strip() == "0" or any(os.environ.get(v) for v in PROXY_VARS):
        return None
    reason = _probe(os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT)
    if reason is not None:
        _go_offline(reason)
    return reason

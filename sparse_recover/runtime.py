"""Small runtime helpers: progress bars, wall time and peak memory, versions for the manifest."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator


def progress(total: int, desc: str):
    """A tqdm bar on stderr (disabled with SPARSE_RECOVER_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("SPARSE_RECOVER_NO_PROGRESS", "") not in ("", "0")
    return tqdm(total=total, desc=desc, unit="block", disable=disable, file=sys.stderr, dynamic_ncols=True)


def quiet_libraries() -> None:
    """With SPARSE_RECOVER_NO_PROGRESS set, silence transformers' own progress bars too."""
    if os.environ.get("SPARSE_RECOVER_NO_PROGRESS", "") not in ("", "0"):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / (1024 * 1024)


class Meter:
    """Wall time and peak memory of a block of work."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wall_s = 0.0
        self.peak: dict[str, float] = {}

    def stop(self) -> dict[str, Any]:
        import torch

        self.wall_s = time.perf_counter() - self.start
        self.peak = {"host_rss_mib": round(peak_rss_mb(), 1)}
        if torch.cuda.is_available():
            self.peak["cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return {"wall_time_s": round(self.wall_s, 3), "peak_memory": self.peak}


@contextmanager
def metered() -> Iterator[Meter]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    meter = Meter()
    yield meter
    if not meter.wall_s:
        meter.stop()


def versions() -> dict[str, str]:
    import torch
    import transformers

    from sparse_recover import __version__

    return {
        "sparse_recover": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

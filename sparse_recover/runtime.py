"""Small runtime helpers: the output policy (--quiet, default, --verbose) and progress bars, wall time and
peak memory, versions for the manifest.

Output policy (set once per command by the CLI's app callback through `configure_output`):
  default   our result lines, warnings and errors, and one progress bar per long loop (`progress`); the
            libraries' progress bars ("Loading weights", "Writing model shards", hub and datasets
            downloads, lm-eval's bars), lm-eval's "bootstrapping for stddev" lines and git's
            "fatal: not a git repository" (lm-eval asks git for a commit hash) are silenced.
  --verbose all of the above, a header per pipeline stage, and every loop's final progress line.
  --quiet   only the command's summary line(s) (`summary`, `result_output`) and errors; our own bars are
            off too. Standard output is swallowed until `finish_output`, which prints the last line written
            when the command marked no summary line.
SPARSE_RECOVER_NO_PROGRESS=1 turns every progress bar off (ours and the libraries') at any verbosity.
"""

from __future__ import annotations

import io
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

QUIET, NORMAL, VERBOSE = 0, 1, 2
PROGRESS_INTERVAL_S = 60.0  # off a terminal: a progress line at most this often (SPARSE_RECOVER_PROGRESS_INTERVAL)


class _LastLine(io.TextIOBase):
    """Standard output under --quiet: remembers the last non-empty line written, shows nothing."""

    encoding = "utf-8"

    def __init__(self) -> None:
        super().__init__()
        self.last, self._partial = "", ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.last = line
        return len(text)


class _Output:
    level = NORMAL
    depth = 0  # > 0 inside a pipeline stage: its result lines are the stage's, not the command's summary
    stdout: Any = None  # the real standard output while --quiet swallows sys.stdout
    summarised = False
    undo: list[Callable[[], None]] = []


_out = _Output()


def configure_output(level: int) -> None:
    """Set the output policy of this process (see the module docstring). Cheap: no library is imported."""
    import warnings

    finish_output(ok=False)
    _out.level = level
    if level == QUIET:
        _out.stdout, sys.stdout = sys.stdout, _LastLine()
        catcher = warnings.catch_warnings()
        catcher.__enter__()
        warnings.simplefilter("ignore")
        _out.undo.append(lambda: catcher.__exit__(None, None, None))


def finish_output(ok: bool = True) -> None:
    """End of a command: restore standard output (under --quiet print the last line written when no summary
    line was marked and the command succeeded), undo the library settings, back to the default policy."""
    if _out.stdout is not None:
        swallowed, sys.stdout = sys.stdout, _out.stdout
        _out.stdout = None
        last = getattr(swallowed, "last", "")
        if ok and not _out.summarised and last:
            print(last)
    while _out.undo:
        _out.undo.pop()()
    _out.level, _out.depth, _out.summarised = NORMAL, 0, False


def verbosity() -> int:
    return _out.level


@contextmanager
def result_output() -> Iterator[None]:
    """What is printed inside is the command's result: shown under --quiet too (unless inside a pipeline stage)."""
    if _out.stdout is None or _out.depth:
        yield
        return
    swallowed, sys.stdout = sys.stdout, _out.stdout
    try:
        yield
    finally:
        sys.stdout = swallowed
        _out.summarised = True


def summary(line: str) -> None:
    """Print one result line of the command (the line --quiet keeps)."""
    with result_output():
        print(line, flush=True)


@contextmanager
def pipeline_stage() -> Iterator[None]:
    """A stage run by `sparse-recover run`: its result lines are not the run's summary."""
    _out.depth += 1
    try:
        yield
    finally:
        _out.depth -= 1


def _no_progress() -> bool:
    return os.environ.get("SPARSE_RECOVER_NO_PROGRESS", "") not in ("", "0")


def progress(total: int, desc: str, unit: str = "item"):
    """One progress bar on stderr for a long loop counting `unit`s (block, step, window, item).

    On a terminal: a tqdm bar that shows after half a second and is cleared when the loop ends (the result
    line follows; --verbose leaves it). Off a terminal (a log file, a pipe, CI): `LineProgress`, plain lines
    without carriage returns. Off with --quiet or SPARSE_RECOVER_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    if _no_progress() or _out.level == QUIET:
        return tqdm(total=total, desc=desc, unit=unit, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, delay=0.5,
                    leave=_out.level >= VERBOSE)
    try:
        interval = float(os.environ.get("SPARSE_RECOVER_PROGRESS_INTERVAL", PROGRESS_INTERVAL_S))
    except ValueError:
        interval = PROGRESS_INTERVAL_S
    return LineProgress(total, desc, unit, interval=interval, final=_out.level >= VERBOSE)


class LineProgress:
    """The progress bar off a terminal: one plain line at most every `interval` seconds while the loop runs,
    and a final line when it ends if any was printed (always with `final`): a short loop leaves nothing.
    Offers the part of tqdm's interface the loops use (update, set_postfix, write, close, unit)."""

    def __init__(self, total: int, desc: str, unit: str, *, interval: float, final: bool = False):
        self.total, self.desc, self.unit, self.interval, self.final = total, desc, unit, interval, final
        self.n, self.postfix, self.printed, self.closed = 0, "", None, False  # printed: the count last shown
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if n and not self.closed and now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    @staticmethod
    def write(text: str, file=None, end: str = "\n") -> None:
        print(text, end=end, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if (self.printed is not None or self.final) and self.printed != self.n:
                self._line(time.monotonic())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self, now: float) -> None:
        self.printed = self.n
        share = f"/{self.total} {self.unit}s ({self.n / self.total:.0%})" if self.total else f" {self.unit}s"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{share} in {format_seconds(now - self.start)}{extra}", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """Apply the output policy to the libraries (every command calls it before its heavy work): their
    progress bars only with --verbose (never with SPARSE_RECOVER_NO_PROGRESS=1), their warnings not with --quiet."""
    from transformers.utils import logging as hf_logging

    bars = _out.level >= VERBOSE and not _no_progress()
    if _no_progress():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # accelerate-launched workers too
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()  # transformers' and the hub's
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
    elif not bars:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if _out.level == QUIET and hf_logging.get_verbosity() < hf_logging.ERROR:
        before = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        _out.undo.append(lambda: hf_logging.set_verbosity(before))


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

"""Measuring what a piece of work costs: wall time and peak memory.

CPU: the process's resident set size (RSS), sampled by a background thread while the context is
open (``getrusage``'s ``ru_maxrss`` only ever grows over the process's life, so it cannot tell
what one step of several cost). Before the first sample, garbage is collected and glibc is asked
to hand freed heap back to the system (``malloc_trim``), so that memory an earlier step freed but
kept does not hide this step's growth. Spikes shorter than the sampling interval can be missed.
CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the allocator's cache).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import threading
import time

import torch

_MB = 1024 * 1024


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def rss_bytes() -> int | None:
    """Current resident set size of this process in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # psutil absent or unsupported here
        return None


def release_free_memory() -> None:
    """Collect garbage and return freed heap pages to the system (glibc only; else a no-op)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: peak memory while open, in MiB.

    After exit: ``start_mb`` (at entry), ``peak_mb`` (the highest seen), ``increase_mb``
    (peak - start: what the work inside added) and ``kind`` (what was measured:
    "cuda-allocated", "cpu-rss" or "cpu-maxrss", the last being the process's lifetime peak,
    used only where RSS cannot be sampled).
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = self.increase_mb = 0.0
        self.kind = ""
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_bytes() or 0
            if now > self._peak:
                self._peak = now

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        if self.device.type == "cuda":
            self.kind = "cuda-allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        start = rss_bytes()
        if start is None:
            self.kind = "cpu-maxrss"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self.kind = "cpu-rss"
        self._start = self._peak = start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda-allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu-maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, rss_bytes() or 0)
        self.start_mb = self._start / _MB
        self.peak_mb = peak / _MB
        self.increase_mb = max(0.0, peak - self._start) / _MB


class Stopwatch:
    """Context manager: wall seconds in ``seconds`` (CUDA work is waited for at both ends) and
    the process's CPU seconds (all threads, user + system) in ``cpu_seconds``: on a shared
    machine the latter is what the work itself cost."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.seconds = self.cpu_seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0

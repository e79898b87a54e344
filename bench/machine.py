"""What the benchmark ran on: CPU, memory, software versions, load, and the command line."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import onnxruntime as ort

from bench.serverproc import REPO

R = TypeVar("R")
QUIET_WINDOW_S = 0.3  # long enough for /proc's 10 ms CPU ticks to mean something


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, re.M)
    return m.group(1).strip() if m else None


def cpu_model() -> str | None:
    return _first(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text())


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs; what ORT's intra-op default counts."""
    text = Path("/proc/cpuinfo").read_text()
    pairs = set(re.findall(r"^physical id\s*:\s*(\d+)$[\s\S]*?^core id\s*:\s*(\d+)$", text, re.M))
    return len(pairs) or (os.cpu_count() or 1)


def ram_gib() -> float:
    kib = _first(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return round(int(kib or 0) / 2**20, 1)


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (every process, every core), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class OutsideLoad:
    """Cores kept busy by processes other than `pids` while the block runs: the noise."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.cores = 0.0
        self.wall = 0.0

    def _reading(self) -> tuple[float, float, float]:
        own = sum(process_cpu_seconds(pid) for pid in self.pids)
        return time.monotonic(), busy_cpu_seconds(), own

    def __enter__(self) -> OutsideLoad:
        self._start = self._reading()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = (b - a for a, b in zip(self._start, self._reading(), strict=True))
        self.wall, self.cores = wall, round(max(0.0, busy - own) / wall, 2)


class QuietRetry:
    """Runs a measurement once the machine is quiet: other processes must keep at most
    `max_cores` busy in the QUIET_WINDOW_S before it and, when it lasts that long, during it.
    Tries again for up to `patience_s` seconds, then keeps the last attempt, noise and all."""

    def __init__(self, *pids: int, max_cores: float, patience_s: float) -> None:
        self.pids, self.max_cores, self.patience_s = pids, max_cores, patience_s
        self.retries = 0  # over the whole run, for the report

    def run(self, measure: Callable[[], R]) -> tuple[R, float]:
        """measure()'s result and the other processes' load (cores) around it."""
        deadline = time.monotonic() + self.patience_s
        while True:
            with OutsideLoad(*self.pids) as before:
                time.sleep(QUIET_WINDOW_S)  # also lets our own spinning thread pools wind down
            if before.cores > self.max_cores and time.monotonic() < deadline:
                self.retries += 1
                continue
            with OutsideLoad(*self.pids) as during:
                result = measure()
            # /proc counts CPU time in 10 ms ticks: a shorter window says little on its own.
            cores = max(before.cores, during.cores if during.wall >= QUIET_WINDOW_S else 0.0)
            if cores <= self.max_cores or time.monotonic() > deadline:
                return result, cores
            self.retries += 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def describe(threads: int) -> dict[str, Any]:
    """The machine and software, for the JSON report."""
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "physical_cores": physical_cores(),
        "ram_gib": ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "intra_op_threads": threads,
        "intra_op_threads_note": "0 = onnxruntime's default, one per physical core",
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE",
                                              "OPENBLAS_L2_SIZE", "HF_HUB_OFFLINE")},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench", *sys.argv[1:]],
        "git": git_commit(),
    }

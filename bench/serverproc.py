"""The real server as a subprocess (`python -m router serve`): ports, memory, metrics, stop."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

SERVING = re.compile(r"serving model \S+ .* on 127\.0\.0\.1:(\d+)")
METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
REPO = Path(__file__).resolve().parents[1]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


def throwaway_decision_log() -> tuple[tempfile.TemporaryDirectory[str], str]:
    """A temporary folder (removed when the object is dropped) and a SQLite log URL inside it."""
    folder = tempfile.TemporaryDirectory(prefix="bench-log-")
    return folder, f"sqlite:///{folder.name}/decisions.db"


class ServerProcess:
    """`python -m router serve` on 127.0.0.1 with port 0 for gRPC and metrics; its log is kept."""

    def __init__(self, model_dir: Path, *, threads: int, decision_log: str = "",
                 startup_timeout: float = 120.0, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        """`args`: more flags of `python -m router serve`; `env`: more (or overriding) environment."""
        cmd = [sys.executable, "-m", "router", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--device", "cpu", "--model-dir", str(model_dir),
               "--intra-op-threads", str(threads), *args]
        if not decision_log:  # the log is on, as in production, in a throwaway SQLite file
            self._log_dir, decision_log = throwaway_decision_log()
        env = os.environ | {"HF_HUB_OFFLINE": "1", "ROUTER_DECISION_LOG_URL": decision_log,
                            "ROUTER_DECISION_LOG_SALT": "bench"} | dict(env or {})
        self.command = cmd
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True, name="server-log").start()
        self.port, self.metrics_port = self._wait_for_ports(startup_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.proc.stderr is not None, "Popen was given stderr=PIPE. This is a bug."
        for line in self.proc.stderr:  # keep reading, so a chatty server never blocks on the pipe
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_ports(self, timeout: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        metrics_port = None
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if m := METRICS.search(line):
                metrics_port = int(m.group(1))
            if (m := SERVING.search(line)) and metrics_port is not None:
                return int(m.group(1)), metrics_port
        self.stop()
        log = "".join(self.log)
        raise RuntimeError(f"server did not report SERVING with a metrics port:\n{log}")

    def rss_mib(self) -> float:
        """Resident memory (VmRSS) of the server process, in MiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
        return kib / 1024

    def metric(self, name: str, **labels: str) -> float:
        """A sample from the /metrics endpoint, e.g. `router_batch_size_sum`, summed over the
        samples whose labels include `labels`."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with NO_PROXY.open(url, timeout=10) as resp:
            text = resp.read().decode("utf-8")
        return sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def histogram(self, name: str, **labels: str) -> tuple[float, float]:
        """A histogram's (sum, count) so far; differences between two readings give a mean."""
        return self.metric(name + "_sum", **labels), self.metric(name + "_count", **labels)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then kill if it outlives `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ServerGroup:
    """`replicas` servers on ports of their own, sharing one decision log, behind one
    round-robin gRPC target: the several-replicas set-up of the README. Metrics are summed over
    the replicas; with one replica it is that server, its plain address and no options."""

    def __init__(self, model_dir: Path, *, replicas: int, threads: int, decision_log: str = "",
                 args: Sequence[str] = ()) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        if not decision_log:  # on, as in production, one throwaway SQLite file for all replicas
            self._log_dir, decision_log = throwaway_decision_log()
        self.servers: list[ServerProcess] = []
        try:
            for _ in range(replicas):
                self.servers.append(ServerProcess(model_dir, threads=threads,
                                                  decision_log=decision_log, args=args))
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(s.pid for s in self.servers)

    @property
    def command(self) -> list[str]:
        return self.servers[0].command

    @property
    def target(self) -> str:
        if len(self.servers) == 1:
            return self.servers[0].target
        return "ipv4:" + ",".join(s.target for s in self.servers)

    @property
    def channel_options(self) -> list[tuple[str, str]]:
        """Spread the calls of one channel over the replicas, one call each in turn."""
        return [("grpc.lb_policy_name", "round_robin")] if len(self.servers) > 1 else []

    def rss_mib(self) -> float:
        """Resident memory of all replicas together, in MiB."""
        return sum(s.rss_mib() for s in self.servers)

    def metric(self, name: str, **labels: str) -> float:
        return sum(s.metric(name, **labels) for s in self.servers)

    def histogram(self, name: str, **labels: str) -> tuple[float, float]:
        pairs = [s.histogram(name, **labels) for s in self.servers]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stops every replica; the first non-zero exit code, else 0 (None if none ran)."""
        codes = [s.stop(timeout) for s in self.servers]
        return next((c for c in codes if c), codes[0] if codes else None)

"""`python -m router serve` as a child process on port 0, for tests that need a real process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from tests.conftest import REPO


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return os.environ | {
        "HF_HUB_OFFLINE": "1", "ROUTER_INTRA_OP_THREADS": "1", "ROUTER_METRICS_PORT": "0",
        "ROUTER_DECISION_LOG_URL": f"sqlite:///{tmp_path / 'decisions.db'}", "ROUTER_DECISION_LOG_SALT": "test",
    } | extra


def start_server(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], int]:
    """Start the server and wait until it logs SERVING; returns the process and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--port", "0", "--device", "cpu", *args],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )
    port, lines, deadline = None, [], time.monotonic() + 60
    while port is None and time.monotonic() < deadline:
        line = proc.stderr.readline() if proc.stderr else ""
        if not line:
            break
        lines.append(line)
        if m := re.search(r"serving model \S+ .* on 127\.0\.0\.1:(\d+)", line):
            port = int(m.group(1))
    if port is None:
        proc.kill()
        proc.wait()
        raise AssertionError("server did not report SERVING:\n" + "".join(lines))
    # Keep reading: a server that logs more than the pipe holds (64 KiB) would block on its
    # next log line, and every call after it would hang. Its lines go to the test's stderr.
    threading.Thread(target=_forward, args=(proc.stderr,), daemon=True).start()
    return proc, port


def _forward(stream: IO[str] | None) -> None:
    for line in stream or ():
        sys.stderr.write(line)

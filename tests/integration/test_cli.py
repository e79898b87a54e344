"""`python -m router serve` as a process: starts on port 0, answers the client, stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import REPO


def test_serve_process_answers_client_and_stops_on_sigterm():
    env = os.environ | {"HF_HUB_OFFLINE": "1", "ROUTER_INTRA_OP_THREADS": "1", "ROUTER_METRICS_PORT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--port", "0", "--device", "cpu"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        port, lines, deadline = None, [], time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"serving model \S+ .* on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        assert port, "server did not report SERVING:\n" + "".join(lines)
        out = subprocess.run(
            [sys.executable, "-m", "router.client", "--target", f"127.0.0.1:{port}",
             "What is the capital of Australia?"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert re.match(r"tier (budget|mid|frontier) \(", out.stdout)
        assert "quality" in out.stdout and "decision" in out.stdout
        bad = subprocess.run(
            [sys.executable, "-m", "router.client", "--target", f"127.0.0.1:{port}", "--profile", "nope", "x"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT: profile: unknown profile 'nope'" in bad.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

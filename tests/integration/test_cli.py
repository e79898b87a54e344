"""`python -m router serve` as a process: starts on port 0, answers the client, stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from tests.conftest import REPO
from tests.integration.serveproc import server_env, start_server


def test_serve_process_answers_client_and_stops_on_sigterm(tmp_path):
    env = server_env(tmp_path)
    proc, port = start_server(env)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "router.client", "--target", f"127.0.0.1:{port}",
             "What is the capital of Australia?"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert re.match(r"tier (budget|mid|frontier) \(", out.stdout)
        assert "quality" in out.stdout and "on the frontier tier" in out.stdout
        decision = re.search(r"decision ([0-9a-f]{32})", out.stdout).group(1)
        ack = subprocess.run(
            [sys.executable, "-m", "router.client", "--target", f"127.0.0.1:{port}", "--outcome", "success", decision],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
        )
        assert ack.returncode == 0 and ack.stdout.strip() == f"{decision}: recorded", ack.stderr
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

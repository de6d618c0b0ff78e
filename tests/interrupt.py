"""Run a training command in a subprocess and stop it with SIGTERM once it has logged a few lines."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sigterm_after(cmd: list[str], run: Path, lines: int = 2, timeout: float = 120, env: dict | None = None):
    """Start cmd (argv), wait until run/metrics.jsonl has `lines` lines, send SIGTERM, and return
    (exit code, stderr). Fails if the process ends or does not log in time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "metrics.jsonl"
    try:
        deadline = time.time() + timeout
        while not (log.exists() and len(log.read_text().splitlines()) >= lines):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def python_script(code: str) -> list[str]:
    return [sys.executable, "-c", code]

"""Runs a chaos scenario script (a cluster of its own: head + worker nodes cannot share a process with
the session's Ray) and returns the JSON it prints on its `RESULT ` line."""

import json
import subprocess
import sys
from pathlib import Path


def run_scenario(script: str, tmp_path: Path) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])

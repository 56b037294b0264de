"""A test helper: run `python -m minilora ...`, SIGKILL it once its checkpoint reaches a step, return the step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kill_at_step(args: list[str], out: Path, step: int) -> int:
    """Start the command, wait (no wall-clock limit: a busy machine only makes it slower) until out's checkpoint
    holds at least `step`, kill -9 it and return the checkpoint's step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "minilora", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"
    while proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return json.loads(state.read_text())["step"]

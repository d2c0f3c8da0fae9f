"""Running commands and waiting by polling (never fixed sleeps)."""

from __future__ import annotations

import subprocess
import time


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on failure show what it printed."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([str(c) for c in cmd], **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def wait_for(predicate, timeout=20.0, what="condition", first_delay=0.005, max_delay=0.1):
    """Poll predicate() (backing off from first_delay to max_delay) until it is true; AssertionError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_delay)

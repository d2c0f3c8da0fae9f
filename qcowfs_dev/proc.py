"""Running commands and waiting by polling (never fixed sleeps); the checkout the tools run from."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Union

#: a path as the helpers take it: str or pathlib.Path
StrPath = Union[str, "os.PathLike[str]"]

#: the checkout this package belongs to (qcowfs_dev/ sits beside qcowfs/)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_env(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """ENV (default os.environ) with this checkout first on PYTHONPATH: a `python -m qcowfs` started
    with it runs this checkout's package, whatever the interpreter has installed."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, out.get("PYTHONPATH")]))
    return out


def run(cmd: Iterable[Any], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure show what it printed."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run([str(c) for c in cmd], **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 20.0,
    what: str = "condition",
    first_delay: float = 0.005,
    max_delay: float = 0.1,
) -> None:
    """Poll predicate() (backing off from first_delay to max_delay) until it is true; AssertionError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_delay)

"""scripts/soak as a test: random writes, reads, fsyncs, bitmap commands, kill -9 and clean restarts
against a live mount, checked against a reference file and QEMU (see scripts/soak).

QCOWFS_SOAK_SECONDS sets the duration (default 30, so the whole suite stays under 15 minutes
on 2 cores; scripts/soak --seconds N runs longer); QCOWFS_SOAK_SEED a fixed seed (default
random, printed, and named in any failure message).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import needs_fuse
from support.repo import ROOT

SECONDS = float(os.environ.get("QCOWFS_SOAK_SECONDS", "30"))


@needs_fuse
@pytest.mark.slow
@pytest.mark.timeout(int(SECONDS * 3) + 600)
def test_soak(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "soak"),
        "--seconds",
        str(SECONDS),
        "--workdir",
        str(tmp_path),
    ]
    if os.environ.get("QCOWFS_SOAK_SEED"):
        cmd += ["--seed", os.environ["QCOWFS_SOAK_SEED"]]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT)
    )
    try:
        out, err = p.communicate(timeout=SECONDS * 3 + 480)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # the soak tears its mounts and daemons down on SIGTERM
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        raise AssertionError(f"scripts/soak did not finish in time:\n{out}\n{err}") from None
    print(out)
    assert p.returncode == 0, f"scripts/soak exited {p.returncode}:\n{out}\n{err}"
    assert "soak: OK" in out, out

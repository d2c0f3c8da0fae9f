"""The fast FUSE request loop's private hook is watched (qcowfs/fuse/request_loop.py, issue 11 item 7).

- on the installed pyfuse3 the fast waiter really serves the requests (its counters, logged at
  shutdown), not merely gets installed: when a pyfuse3 upgrade makes qcowfs fall back to the
  stock loop, this fails instead of the mount silently getting three times slower;
- a stop signal that arrives while the loop is blocked in poll() is seen when poll() returns,
  not up to `checkpoint_every` requests later;
- a pyfuse3 without the hook, or of a version the hook was not checked against, gets
  pyfuse3's own loop, says so in one log line, and still serves reads and writes correctly.

Which pyfuse3 releases get the hook at all: tests/unit/test_fuseloop_hook.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
from conftest import assert_clean, needs_fuse, qemu_io, wait_for
from support.images import create

KiB = 1024
MiB = 1024 * KiB

SERVED = re.compile(r"request loop: (\d+) requests through the fast waiter")
UNAVAILABLE = "fast FUSE request loop unavailable"


#: the guest data of every image here
FILL = ["write -P 0x3c 0 4M"]


@needs_fuse
def test_fast_waiter_serves_the_requests(tmp_path, mount):
    img = create(tmp_path / "f.qcow2", "8M", writes=FILL)
    # without request lanes (lanes.py), which would serve these reads before the waiter sees them
    m = mount(img, read_only=True, extra=("-o", "lanes=0"))
    fd = os.open(m.disk, os.O_RDONLY)  # disk.raw is direct_io: every pread is one FUSE read
    try:
        for i in range(200):
            assert os.pread(fd, 4096, i * 4096 * 5 % (4 * MiB)) == b"\x3c" * 4096
    finally:
        os.close(fd)
    assert m.unmount() == 0
    log = m.log_text()
    assert UNAVAILABLE not in log, (
        "qcowfs fell back to pyfuse3's own request loop on the installed pyfuse3: read that "
        f"version's internal.pxi (_wait_fuse_readable, _session_loop) against qcowfs/fuse/request_loop.py, "
        f"then extend fuseloop._VERIFIED\n{log}"
    )
    served = SERVED.findall(log)
    assert len(served) == 1, f"no (or more than one) request loop summary at shutdown:\n{log}"
    assert int(served[0]) >= 200, f"the fast waiter served only {served[0]} of 200+ requests"
    from qcowfs.fuse.request_loop import public_hook

    # scripts/setup builds pyfuse3 with the public hook (patches/): the private one is the fallback
    assert public_hook(), (
        "the installed pyfuse3 lacks main(wait_readable=): run scripts/build-pyfuse3"
    )
    assert "public hook" in log, log


@needs_fuse
def test_stop_signal_while_blocked_in_poll_is_seen_when_poll_returns(tmp_path, mount):
    """One read every 5 ms: longer than the loop spins (50 us), shorter than it blocks in poll
    (20 ms), so it never parks in trio, where a signal is seen at once. A SIGTERM that lands
    while it is blocked in poll() must stop it when poll() returns: without the re-check the
    next checkpoint came up to 64 requests (here 0.3 s) later."""
    img = create(tmp_path / "f.qcow2", "8M", writes=FILL)
    m = mount(img)
    sent = threading.Event()
    before, after = [0], [0]

    def trickle():
        fd = os.open(m.disk, os.O_RDONLY)
        try:
            while True:
                os.pread(fd, 4096, 0)
                (after if sent.is_set() else before)[0] += 1
                time.sleep(0.005)
        except OSError:
            pass  # the mount went away: expected
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    wait_for(lambda: before[0] >= 20, what="the trickle of reads to be served")
    sent.set()
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=60) == 0
    t.join(timeout=60)
    assert not t.is_alive()
    wait_for(lambda: not os.path.ismount(m.mnt), what="unmount after SIGTERM")
    # one read may have been in flight when the signal was sent; a couple more of slack for
    # a slow machine, far below the up to 64 of a loop that waits for its next checkpoint
    assert after[0] <= 3, f"{after[0]} reads were served after SIGTERM"
    m.assert_no_traceback()


# Run in the daemon (PYTHONPATH=<dir>): changes pyfuse3 as a future release might, and nothing else.
SITECUSTOMIZE = """
import builtins, os
import pyfuse3

how = os.environ.get("QCOWFS_TEST_PYFUSE3")
if how and "wait_readable" in __import__("inspect").signature(pyfuse3.main).parameters:
    # qcowfs' patched pyfuse3: hide its public hook too, as a release without the patch would
    _main = pyfuse3.main

    async def main(min_tasks=1, max_tasks=99):
        return await _main(min_tasks, max_tasks)

    pyfuse3.main = main
if how == "no-hook":
    # A Cython module looks its globals up in the module dict, then in builtins: moved there,
    # pyfuse3's own loop still finds its waiter, but pyfuse3 no longer has the attribute,
    # which is what a release that renamed or inlined it looks like to qcowfs.
    builtins._wait_fuse_readable = pyfuse3._wait_fuse_readable
    del pyfuse3._wait_fuse_readable
elif how == "version":
    pyfuse3.__version__ = "3.99.0"
"""


@needs_fuse
@pytest.mark.parametrize("how, reason", [("no-hook", "_wait_fuse_readable"), ("version", "3.99.0")])
def test_unknown_pyfuse3_falls_back_to_its_own_loop(tmp_path, mount, monkeypatch, how, reason):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("QCOWFS_TEST_PYFUSE3", how)
    img = create(tmp_path / "f.qcow2", "16M", writes=FILL)
    m = mount(img)
    fd = os.open(m.disk, os.O_RDWR)
    try:
        for i in range(64):
            os.pwrite(fd, bytes([i + 1]) * 4096, 4 * MiB + i * 65536)
        for i in range(64):
            assert os.pread(fd, 4096, 4 * MiB + i * 65536) == bytes([i + 1]) * 4096
        assert os.pread(fd, 4096, 0) == b"\x3c" * 4096
    finally:
        os.close(fd)
    assert m.unmount() == 0
    log = m.log_text()
    lines = [line for line in log.splitlines() if UNAVAILABLE in line]
    assert len(lines) == 1 and reason in lines[0], (
        f"expected one fallback line naming {reason!r}:\n{log}"
    )
    assert "request loop: pyfuse3's own" in log and not SERVED.search(log), log
    # QEMU reads back what went through the stock loop
    for i in range(0, 64, 9):
        qemu_io(img, f"read -P {i + 1} {4 * MiB + i * 65536} 4k")
    qemu_io(img, "read -P 0x3c 0 4M")
    assert_clean(img)

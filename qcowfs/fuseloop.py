"""pyfuse3's request loop, without two trio scheduler passes per request.

pyfuse3.main() runs one loop per worker task: wait until /dev/fuse is readable,
read one request, run its handler, repeat. Its waiter (pyfuse3 3.x,
internal.pxi `_wait_fuse_readable`) takes a trio.Lock and then calls
trio.lowlevel.wait_readable(): two trips through trio's scheduler, each with an
epoll_ctl/epoll_wait and a few dozen microseconds of Python, for every request.
qcowfs' handlers never await, so requests are served one at a time anyway and
that machinery buys nothing. Measured on this project's machine (scripts/bench,
target "stock"): with 4 parallel 4 KiB readers it holds a pass-through file to
28k IOPS, where this loop serves 95k.

install() replaces that waiter (the Cython loop looks the name up in the module
globals on every iteration) with one that

1. asks the kernel with poll(0), and keeps asking for up to `spin_us` (50 us;
   environment QCOWFS_SPIN_US, 0 turns it off): under load the next request is
   a few microseconds away, and a CPU that stays awake takes it at once, where
   a sleeping one (a halted vCPU above all) costs tens of microseconds to wake.
   QEMU's event loop polls the same way (its poll-max-ns). Measured: 4 KiB
   random reads 14.5k -> 29-32k IOPS;
2. then blocks in poll() for up to `block_ms` (20 ms), still without trio;
3. only when the mount stays idle that long, parks in trio's wait_readable as
   pyfuse3 does, so an idle daemon costs nothing;
4. passes through trio's scheduler every `checkpoint_every` requests, so other
   tasks (the signal watcher) run even under a request storm.

It needs one worker task: call run() instead of pyfuse3.main(), and exit() (not
pyfuse3.terminate() alone) to stop it. If pyfuse3 ever drops or renames the
waiter, install() refuses and run() falls back to stock pyfuse3.main().
"""

from __future__ import annotations

import logging
import os
import select
from time import monotonic_ns
from typing import Optional

import pyfuse3
import trio

log = logging.getLogger(__name__)

_WAITER = "_wait_fuse_readable"


def fuse_device_fd() -> Optional[int]:
    """The file descriptor of this process's /dev/fuse session (pyfuse3 keeps it private)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def _spin_from_env(default: int = 50) -> int:
    value = os.environ.get("QCOWFS_SPIN_US")
    if value is None:
        return default
    try:
        return max(0, int(value))
    except ValueError:
        log.warning("QCOWFS_SPIN_US=%r is not a number of microseconds; using %d", value, default)
        return default


class FastLoop:
    """Serves a pyfuse3 session set up with pyfuse3.init(), in the current trio run."""

    def __init__(self, spin_us: Optional[int] = None, block_ms: int = 20, checkpoint_every: int = 64):
        if spin_us is None:
            spin_us = _spin_from_env()
        self.spin_ns = spin_us * 1000
        self.block_ms = block_ms
        self.checkpoint_every = checkpoint_every
        self.fd: Optional[int] = None
        self.exiting = False
        self._poll = select.poll()
        self._since_checkpoint = 0
        self._original = None
        self.fast = False

    # ------------------------------------------------------------------ setup
    def install(self) -> bool:
        """Swap in the fast waiter; False (and stock pyfuse3 behaviour) if that is not possible."""
        original = getattr(pyfuse3, _WAITER, None)
        fd = fuse_device_fd()
        if original is None or fd is None:
            log.warning("fast FUSE request loop unavailable (pyfuse3 %s); using pyfuse3's own",
                        getattr(pyfuse3, "__version__", "?"))
            return False
        self.fd = fd
        self._poll.register(fd, select.POLLIN)
        self._original = original
        setattr(pyfuse3, _WAITER, self._wait)
        self.fast = True
        log.debug("fast FUSE request loop on fd %d (spin %d us)", fd, self.spin_ns // 1000)
        return True

    def uninstall(self) -> None:
        if self._original is not None:
            setattr(pyfuse3, _WAITER, self._original)
            self._original = None
        self.fast = False

    # ------------------------------------------------------------------ serving
    async def run(self) -> None:
        """Serve until unmounted or exit(); the equivalent of `await pyfuse3.main()`."""
        if not self.fast and not self.install():
            await pyfuse3.main()
            return
        try:
            # One worker: our waiter keeps no count of idle readers, and with handlers that
            # never await, more workers would only take turns.
            await pyfuse3.main(min_tasks=1, max_tasks=1)
        finally:
            self.uninstall()

    def exit(self) -> None:
        """Stop serving (from the trio thread): the loop returns after the current request."""
        self.exiting = True
        pyfuse3.terminate()

    async def _wait(self) -> bool:
        """pyfuse3's waiter contract: True when /dev/fuse is readable, False to end the loop."""
        if self.exiting:
            return False
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.checkpoint_every:
            self._since_checkpoint = 0
            await trio.lowlevel.checkpoint()  # let the signal watcher in
            if self.exiting:
                return False
        # Blocks the trio thread for at most block_ms: nothing else in the daemon is waiting
        # for it except signal delivery, which at worst waits that long.
        poll = self._poll.poll
        if poll(0):
            return True
        if self.spin_ns:
            deadline = monotonic_ns() + self.spin_ns
            while monotonic_ns() < deadline:
                if poll(0):
                    return True
        if poll(self.block_ms):
            return True
        self._since_checkpoint = 0
        try:
            await trio.lowlevel.wait_readable(self.fd)
        except trio.ClosedResourceError:  # pyfuse3.terminate() -> notify_closing()
            return False
        return not self.exiting

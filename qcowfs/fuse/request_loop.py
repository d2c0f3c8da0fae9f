"""pyfuse3's request loop, without two trio scheduler passes per request.

pyfuse3.main() runs one loop per worker task: wait until /dev/fuse is readable,
read one request, run its handler, repeat. Its waiter (pyfuse3 3.x,
internal.pxi `_wait_fuse_readable`) takes a trio.Lock and then calls
trio.lowlevel.wait_readable(): two trips through trio's scheduler, each with an
epoll_ctl/epoll_wait and a few dozen microseconds of Python, for every request.
A request qcowfs serves inline never needs trio's scheduler (a handler waits only
for host I/O threads or a drain, fuse/operations.py), so for it that machinery buys
nothing. Measured on this project's machine (scripts/bench, target "stock"): with
4 parallel 4 KiB readers it holds a pass-through file to 28k IOPS, where this
loop serves 95k.

install() replaces that waiter (through pyfuse3.main's wait_readable hook, or by
swapping the module global the Cython loop looks up on every iteration: see below)
with one that

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
   tasks (the signal watcher) run even under a request storm;
5. after a blocking poll() looks whether a signal came meanwhile, and if so
   lets trio deliver it before serving another request: with requests a few
   ms apart the loop never parks, and a SIGTERM used to wait for step 4.

Call run() instead of pyfuse3.main(), and exit() (not pyfuse3.terminate() alone)
to stop it. It serves with one worker task, or, once attach_io() has attached host
I/O threads (io_threads.py; public hook only), with a fixed number of workers (the
mount asks for 2 * threads + 1), so requests go on being read while others wait
for their threads. The workers take turns in place of pyfuse3's lock: one waits
at the device, the others park until it returns or until a handler about to await
calls hand_over(). While threads are attached the waiting worker also polls their
eventfd and delivers their completions (a task does it when every worker waits for
a thread), does not spin while a thread is at work (the spin would hold the GIL the
thread needs), and never blocks in poll() while another task could run.

With qcowfs' pyfuse3 patches (patches/pyfuse3-3.5.0-wait-readable-hook.patch, and
-workers-write-view.patch for several workers; scripts/build-pyfuse3 builds them,
scripts/setup runs it) the waiter is handed to pyfuse3.main(wait_readable=...), a public
hook that also passes the /dev/fuse descriptor: no module globals are swapped and no
descriptor is searched for. On a stock pyfuse3 the private hook below is used instead,
with one worker.

The private hook is watched: install() refuses a pyfuse3 outside the
releases it was checked against (_VERIFIED) or without the waiter, logs why
once, and run() falls back to stock pyfuse3.main(). The loop counts its
wake-ups at no cost to the hot path and logs them at shutdown ("request loop:
N requests through the fast waiter"); tests/mount/test_fuseloop.py reads that line,
so a pyfuse3 upgrade that quietly costs the fast path fails a test.
"""

from __future__ import annotations

import inspect
import logging
import os
import select
from time import monotonic_ns
from typing import Optional

import pyfuse3
import trio

from .io_threads import IoThreads
from .lanes import Lanes

log = logging.getLogger(__name__)

_WAITER = "_wait_fuse_readable"

# The pyfuse3 releases whose internal.pxi this hook was read against: from 3.2.0, where
# _session_loop ends when the waiter returns False and terminate() exists (3.1 ignored the
# waiter's result), to 3.5.0; the waiter and its contract are the same in all of them. A newer
# release gets pyfuse3's own loop until someone reads its _wait_fuse_readable/_session_loop and
# extends this (tests/mount/test_fuseloop.py fails meanwhile, so that does not go unnoticed).
_VERIFIED = ((3, 2), (3, 5))

# A signal's delivery, queued in trio by its handler, takes a few scheduler passes to reach the
# signal watcher (the entry queue's task runs the callback, which wakes the watcher, which
# calls exit()); trio has no public "run until the others block" outside trio.testing (which
# imports pytest). This long a sleep lets them all happen; it is taken only when one is queued.
_SETTLE_S = 0.001

_refusal_logged = False

#: with request lanes: a hand-off less than this long ago makes the loop look for the next one
#: before sleeping (_handed_recently), for up to HANDOFF_SPIN_NS
HANDOFF_HOT_NS = 1_000_000
HANDOFF_SPIN_NS = 50_000


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


def hook_refusal() -> Optional[str]:
    """Why the installed pyfuse3 must not get the fast waiter, or None if it may."""
    version = str(getattr(pyfuse3, "__version__", "?"))
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    if not _VERIFIED[0] <= major_minor <= _VERIFIED[1]:
        low, high = (".".join(map(str, v)) for v in _VERIFIED)
        return f"pyfuse3 {version} is not one of the releases ({low} to {high}) its hook was checked against"
    if not inspect.iscoroutinefunction(getattr(pyfuse3, _WAITER, None)):
        return f"pyfuse3 {version} has no coroutine function {_WAITER}"
    return None


def public_hook() -> bool:
    """Whether pyfuse3.main takes wait_readable= (qcowfs' patch): the clean way in."""
    try:
        return "wait_readable" in inspect.signature(pyfuse3.main).parameters
    except (TypeError, ValueError):
        return False


def _trio_has_queued_work() -> bool:
    """Whether a signal handler (or another thread) queued a callback trio has not run yet."""
    return trio.lowlevel.current_statistics().run_sync_soon_queue_size > 0


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

    def __init__(
        self, spin_us: Optional[int] = None, block_ms: int = 20, checkpoint_every: int = 64
    ):
        if spin_us is None:
            spin_us = _spin_from_env()
        self.spin_ns = spin_us * 1000
        self.block_ms = block_ms
        self.checkpoint_every = checkpoint_every
        self.fd: Optional[int] = None
        self.exiting = False
        self._poll = select.poll()
        self._original = None
        self.fast = False
        self.public = False
        # Wake-ups that found a request to read (the last one may be the unmount itself), and of
        # them those that came after blocking in poll() and after parking in trio. `requests` is
        # also the checkpoint clock, so counting costs the hot path nothing it did not pay before.
        self.requests = 0
        self.slept = 0
        self.parked = 0
        self._checkpoint_at = checkpoint_every
        # Host I/O threads (io_threads.py) whose completions this loop delivers, and the
        # workers that take turns at the device while others wait for their threads.
        self.io: Optional[IoThreads] = None
        self.workers = 1
        self._device_busy = False
        self._turns = trio.lowlevel.ParkingLot()
        self._device_poll = select.poll()  # /dev/fuse alone, for pending()
        # Request lanes (lanes.py) read the device instead: this loop then waits for what they
        # hand over (their eventfd, and lanes.pending()), never for the device itself.
        self.lanes: Optional[Lanes] = None
        self._handoff_at = 0  # monotonic_ns of the last hand-off found

    # ------------------------------------------------------------------ setup
    def install(self) -> bool:
        """Swap in the fast waiter; False (and stock pyfuse3 behaviour) if that is not possible."""
        global _refusal_logged
        if public_hook():
            self.fast = self.public = True
            log.debug(
                "fast FUSE request loop through pyfuse3.main(wait_readable=) (spin %d us)",
                self.spin_ns // 1000,
            )
            return True
        reason = hook_refusal()
        fd = fuse_device_fd() if reason is None else None
        if fd is None:
            if not _refusal_logged:  # once per daemon, however often asked
                _refusal_logged = True
                log.warning(
                    "fast FUSE request loop unavailable (%s); using pyfuse3's own",
                    reason or "no single /dev/fuse descriptor in this process",
                )
            return False
        self.fd = fd
        self._poll.register(fd, select.POLLIN)
        self._original = getattr(pyfuse3, _WAITER)
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
            try:
                await pyfuse3.main()
            finally:
                log.info("request loop: pyfuse3's own served this mount (no fast waiter)")
            return
        try:
            if self.public:
                # Several workers only where handlers may await host I/O threads; pyfuse3 starts
                # them as they are needed (no worker waiting at the device) up to max_tasks, and
                # with min_tasks == max_tasks an idle one waits here instead of exiting and being
                # started again at the next burst.
                n = self.workers if self.io is not None else 1
                async with trio.open_nursery() as nursery:
                    if self.io is not None:
                        nursery.start_soon(self._deliver_when_idle, self.io)
                    await pyfuse3.main(min_tasks=n, max_tasks=n, wait_readable=self._wait_on)  # type: ignore[call-arg]
                    nursery.cancel_scope.cancel()
            else:
                # the private hook cannot keep pyfuse3's count of waiting workers: one worker
                await pyfuse3.main(min_tasks=1, max_tasks=1)
        finally:
            self.uninstall()
            log.info(
                "request loop: %d requests through the fast waiter (%d after blocking in poll, "
                "%d after parking in trio; %s hook)",
                self.requests,
                self.slept,
                self.parked,
                "public" if self.public else "private",
            )

    def exit(self) -> None:
        """Stop serving (from the trio thread): the loop returns after the current request."""
        self.exiting = True
        pyfuse3.terminate()
        if self.lanes is not None and self.fd is not None:
            trio.lowlevel.notify_closing(self.fd)  # a worker parked on the lanes' eventfd
        self._turns.unpark_all()

    def pending(self) -> bool:
        """Whether another request waits at the device (one poll(0), about a microsecond)."""
        if self.lanes is not None:
            return self.lanes.pending()
        return bool(self._device_poll.poll(0))

    def can_attach_lanes(self) -> bool:
        """Whether attach_lanes() can work: only through the public hook."""
        if not self.fast and not self.install():
            return False
        return self.public

    def attach_lanes(self, lanes: Lanes) -> None:
        """Serve what request lanes (started, can_attach_lanes() true) hand over instead of
        reading the device. Call before run()."""
        assert self.public, "request lanes need the public hook (can_attach_lanes)"
        self.lanes = lanes
        # no spinning: the lanes need the CPU the spin would burn, and a hand-off is already
        # the slow path
        self.spin_ns = 0

    def attach_io(self, io: IoThreads, workers: int) -> bool:
        """Deliver io's completions and serve up to `workers` requests at once; only through
        the public hook (the private one serves with one worker). False if not possible."""
        if not self.fast and not self.install():
            return False
        if not self.public:
            return False
        self.io = io
        self.workers = workers
        self._poll.register(io.efd, select.POLLIN)
        return True

    async def _wait_on(self, fd: int) -> bool:
        """The public hook's form: pyfuse3 passes the session's descriptor."""
        if self.fd is None:
            if self.lanes is not None:
                fd = self.lanes.efd  # the lanes read the device; they signal hand-offs here
            self.fd = fd
            self._poll.register(fd, select.POLLIN)
            self._device_poll.register(fd, select.POLLIN)
        return await self._wait()

    async def _wait(self) -> bool:
        """pyfuse3's waiter contract: True when /dev/fuse is readable, False to end the loop.

        Workers take turns: one waits at the device (and delivers I/O completions meanwhile),
        the others park. It returns True only from a poll() with no await after it, so the
        caller's read() that follows cannot block (pyfuse3's own waiter uses a lock for this).
        """
        while self._device_busy:
            if self.exiting:
                return False
            await self._turns.park()
        if self.exiting:
            return await self._drain_io()
        self._device_busy = True
        try:
            return await self._wait_device()
        finally:
            self._device_busy = False
            # Wake the next worker on every return, though a handler that never awaits is done
            # before its worker comes back: the worker that reads the end of the session
            # (FUSE_DESTROY) leaves pyfuse3's loop without coming back here, and the others must
            # not stay parked (CI caught a daemon that did not exit after its unmount when only
            # hand_over() and an unmounted device's POLLERR woke them).
            self._turns.unpark()

    def hand_over(self) -> None:
        """A handler is about to await: a parked worker takes the device meanwhile."""
        self._turns.unpark()

    async def _wait_device(self) -> bool:
        self.requests += 1
        if self.requests >= self._checkpoint_at:
            self._checkpoint_at = self.requests + self.checkpoint_every
            await trio.lowlevel.checkpoint()  # let the signal watcher in
            if self.exiting:
                return await self._leave()
        # Blocks the trio thread for at most block_ms: nothing else in the daemon is waiting
        # for it except signal delivery, which at worst waits that long, and I/O completions,
        # whose eventfd is in the same poll set.
        poll = self._poll.poll
        io = self.io
        lanes = self.lanes
        while True:
            if lanes is not None:
                if lanes.pending():
                    self._handoff_at = monotonic_ns()
                    return True  # a hand-off to serve (or the end of the session)
                if lanes.has_touched():
                    lanes.publish_touched()  # nothing to serve: the moment to publish
                    continue
                if self._handed_recently(io):
                    return True
            ready = poll(0)
            # no spinning while a thread is at work: the spin holds the GIL between its polls,
            # and the thread needs it to hand its completion over (a blocking poll releases it)
            if not ready and self.spin_ns and not (io is not None and io.inflight):
                deadline = monotonic_ns() + self.spin_ns
                while not ready and monotonic_ns() < deadline:
                    ready = poll(0)
            if not ready:
                if io is not None and trio.lowlevel.current_statistics().tasks_runnable:
                    await trio.lowlevel.checkpoint()  # never block while a worker could run
                    if self.exiting:
                        return await self._leave()
                    continue
                ready = poll(self.block_ms)
                if ready:
                    self.slept += 1
                    # A stop signal that came while we were blocked has only queued its delivery
                    # in trio (its handler ran inside poll()): look, and if anything is queued
                    # let it through now, rather than serve on until checkpoints let it through
                    # (measured: another 100-160 requests, most of a second with one every
                    # 5 ms). The look costs 1-3 us, paid only after an idle gap longer than the spin.
                    if _trio_has_queued_work():
                        await trio.sleep(_SETTLE_S)
                        if self.exiting:
                            return await self._leave()
                        continue  # poll again: another worker may have run meanwhile
            if ready and lanes is not None and any(fd == self.fd for fd, _ in ready):
                # reset the eventfd, then look (a hand-off queued after the look signals again)
                lanes.clear_signal()
                if lanes.pending():
                    return True
                ready = [r for r in ready if r[0] != self.fd]
                if not ready:
                    continue
            if ready:
                if io is not None and (len(ready) > 1 or ready[0][0] != self.fd):
                    if io.deliver():
                        # the finished requests reply and come back here (and park)
                        while io.resuming:
                            await trio.lowlevel.checkpoint()
                        if self.exiting:
                            return await self._leave()
                    continue
                if ready[0][1] & (select.POLLERR | select.POLLHUP):
                    # unmounted: every worker must come and read the end of the session
                    self._turns.unpark_all()
                    if io is not None and io.inflight:
                        await self._drain_io()  # the requests still running finish first
                return True
            if io is not None and io.inflight:
                continue  # completions come through the eventfd: keep polling, do not park
            self._checkpoint_at = self.requests + self.checkpoint_every
            assert self.fd is not None  # installed
            if self.exiting:
                # exit() came while this worker was at a checkpoint above: its notify_closing()
                # woke only the tasks already waiting, and a wait begun after it never ends
                # (CI: a daemon that did not exit after SIGINT, about 1 run in 16)
                return await self._leave()
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate() -> notify_closing()
                return await self._leave()
            if self.exiting:
                return await self._leave()
            self.parked += 1
            # trio scheduled us: other workers may have run since the device became readable
            continue

    def _handed_recently(self, io: Optional[IoThreads]) -> bool:
        """While the lanes hand requests over often (the last one less than HANDOFF_HOT_NS
        ago: first writes into a fresh image, copy-on-write), look for the next one for up to
        HANDOFF_SPIN_NS before sleeping: an atomic load per look, no system call, where a wake-up
        through the eventfd costs tens of microseconds. Measured: the hand-offs of first writes
        on a fresh image; see docs/performance.md. Not while a host I/O thread runs (the spin
        holds the GIL it needs). True: a hand-off is there."""
        now = monotonic_ns()
        if now - self._handoff_at > HANDOFF_HOT_NS or (io is not None and io.inflight):
            return False
        pending = pyfuse3.lanes_pending
        deadline = now + HANDOFF_SPIN_NS
        while monotonic_ns() < deadline:
            if pending():
                self._handoff_at = monotonic_ns()
                return True
        return False

    async def _deliver_when_idle(self, io: IoThreads) -> None:
        """Completions when no worker waits at the device (every one is waiting for a thread):
        trio's own wait then, which runs only when every task is blocked, or at a checkpoint."""
        while True:
            await trio.lowlevel.wait_readable(io.efd)
            io.deliver()

    async def _drain_io(self) -> bool:
        """On the way out: deliver the I/O still running, so its requests finish; then False."""
        io = self.io
        while io is not None and io.inflight:
            select.select([io.efd], [], [], 0.1)
            io.deliver()
            while io.resuming:
                await trio.lowlevel.checkpoint()
        return False

    async def _leave(self) -> bool:
        """Stop serving from inside _wait_device: the wake-up was counted but serves no request;
        the I/O still running finishes first (_drain_io); False ends pyfuse3's loop."""
        self.requests -= 1
        return await self._drain_io()

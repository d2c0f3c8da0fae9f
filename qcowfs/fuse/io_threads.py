"""Host data I/O off the request loop: a few threads run os.preadv/os.pwritev while the trio
thread goes on reading and deciding the next requests.

Why threads: the request loop is one Python thread, and a 4 KiB pwrite into the host's page
cache costs tens of microseconds here (a 1 MiB one, hundreds): with a queue depth of 16 the
kernel has more requests waiting than one thread can pass through. os.preadv/os.pwritev release
the GIL, so the copies run beside the next request's Python. QEMU does the same with its
thread pool (aio=threads) or io_uring.

What stays on the trio thread: every metadata decision (mapping, allocation, refcounts,
bitmap marking, commits of new L2 entries, flush ordering). A job handed to a thread is only
the data copy, on host ranges the trio thread has reserved for it (write_path.WritePlan).

Completions reach trio without its own cross-thread machinery: a worker appends
(task, outcome) to a deque and bumps an eventfd that request_loop.FastLoop polls together with
/dev/fuse; FastLoop then calls deliver(), which reschedules the waiting tasks. (trio's
to_thread wakes the loop through trio's own wakeup socket, which FastLoop's poll() does not
watch, and costs two scheduler passes per job.)
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import sys
import threading
from resource import RUSAGE_THREAD, getrusage
from time import monotonic_ns
from typing import Any, Callable

import outcome
import trio

log = logging.getLogger(__name__)

DEFAULT_THREADS = 4
SWITCH_INTERVAL_S = 0.0001


def host_wait_start() -> tuple:
    return monotonic_ns(), getrusage(RUSAGE_THREAD)


def host_wait_ns(start: tuple) -> int:
    """How long the calling thread waited since host_wait_start(): wall time minus its CPU
    time, counted only if it blocked (a voluntary context switch). Time it lost to preemption
    on a busy machine is not the host's doing and must not send requests to the threads."""
    wall0, r0 = start
    wall = monotonic_ns() - wall0
    r1 = getrusage(RUSAGE_THREAD)
    if r1.ru_nvcsw == r0.ru_nvcsw:
        return 0
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return max(0, wall - int(cpu * 1e9))


class IoThreads:
    """A fixed pool of host I/O threads whose completions FastLoop delivers."""

    def __init__(self, threads: int = DEFAULT_THREADS):
        self.size = threads
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self.inflight = 0  # jobs submitted and not yet delivered (trio thread only)
        self.jobs = 0  # jobs run, for the shutdown log line
        self.peak = 0  # the most in flight at once
        # delivered and not yet running again: trio runs a rescheduled task in its current
        # batch or the next, and its statistics count only the next (FastLoop waits for these)
        self.resuming = 0
        #: called on the trio thread with each job's wait (wall minus CPU time), in ns
        self.on_sample: Callable[[int], None] = lambda _ns: None
        self._threads = [
            threading.Thread(target=self._work, name=f"qcowfs-io-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()
        # A thread whose copy is done needs the GIL for a few lines before its completion is
        # seen, and the request loop holds it while it works; CPython hands it over when the
        # holder blocks or after the switch interval (5 ms by default: measured, a queue depth
        # 1 read that missed the page cache then took 2.6 ms instead of 0.1 ms).
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL_S))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on an I/O thread and return its result (or raise its exception).
        Not cancellable once submitted: the data copy completes whatever happens to the request."""
        task = trio.lowlevel.current_task()
        self.inflight += 1
        self.jobs += 1
        if self.inflight > self.peak:
            self.peak = self.inflight
        self._jobs.put((task, fn, args))
        try:
            return await trio.lowlevel.wait_task_rescheduled(
                lambda _raise: trio.lowlevel.Abort.FAILED
            )
        finally:
            self.resuming -= 1

    def _work(self) -> None:
        get, done, efd = self._jobs.get, self._done, self.efd
        while True:
            job = get()
            if job is None:
                return
            task, fn, args = job
            before = host_wait_start()
            result = outcome.capture(fn, *args)
            done.append((task, result, host_wait_ns(before)))
            os.eventfd_write(efd, 1)

    def deliver(self) -> int:
        """From the trio thread: reschedule every task whose job finished. Returns how many."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        n = 0
        done = self._done
        note = self.on_sample
        while done:
            task, result, waited = done.popleft()
            trio.lowlevel.reschedule(task, result)
            note(waited)
            n += 1
        self.inflight -= n
        self.resuming += n
        return n

    def close(self) -> None:
        if self.efd < 0:
            return  # closed already
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=10)
        os.close(self.efd)
        self.efd = -1
        sys.setswitchinterval(self._interval)
        # tests/mount/test_concurrency.py reads this line: the storms must have overlapped
        log.info("host I/O threads: %d jobs, up to %d at once", self.jobs, self.peak)

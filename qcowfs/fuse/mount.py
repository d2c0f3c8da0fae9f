"""Mounting: lock, open, serve, and shut down in order.

Order on the way up: open and validate the image (no writes), take QEMU's locks
on the image and its external data file (read-write or read-only user) and on
every backing file (read-only user), load the bitmaps and mark them in_use (with
bitmap_sync=intent: store them valid instead), then pyfuse3.init, then the host
I/O threads (io_threads=N). Only then is the mount announced ready.

Order on the way down (fusermount3 -u, qcowfs umount, SIGTERM, SIGINT, SIGHUP):
leave the request loop, stop the I/O threads, detach the mount, store the bitmaps
(in_use cleared), flush and close the image, release the locks. Exit code 0 for a
clean shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from types import FrameType
from typing import Callable, Optional

import pyfuse3
import trio

from ..engine.disk import Disk
from ..engine.encryption import Keys
from ..engine.image import Qcow2Image
from ..engine.locks import ImageLock
from ..errors import MountError, QcowError
from . import lanes
from .concurrent_io import ConcurrentIo
from .io_threads import IoThreads
from .operations import DISK, HAS_FALLOCATE, QcowOperations
from .options import MountOptions
from .request_loop import FastLoop

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _locks_for(image: Qcow2Image, read_only: bool) -> list:
    """QEMU's locks for every file of the image: the image and its data file as the mount
    uses them, each backing file as a reader."""
    locks = [ImageLock(image.file.fd, image.path, write=not read_only)]
    if image.data_file is not image.file:
        locks.append(ImageLock(image.data_file.fd, image.data_file.path, write=not read_only))
    b = image.backing
    while b is not None:
        locks.append(ImageLock(b.file.fd, b.path, write=False))
        b = getattr(b, "backing", None)
    return locks


class Mounted:
    """A prepared mount: image open, locks held, FUSE session initialised.

    Every resource is pushed on one exit stack the moment it is acquired, so shutdown
    (and the unwinding of a set-up that failed half-way) is the reverse of set-up by
    construction: I/O threads, then FUSE session, then bitmaps + image (Disk.close), then
    locks, then the image's files."""

    def __init__(
        self,
        image_path: str,
        mountpoint: str,
        options: MountOptions,
        keys: Optional[Keys] = None,
    ):
        self.image_path = image_path
        #: passphrases read (and an unlock begun) before this module loaded: early_keys()
        self._keys = keys
        self.mountpoint = mountpoint
        self.options = options
        self.read_only = options.read_only
        self.stack = contextlib.ExitStack()
        self.clean = True  # False once the final writes failed
        self.signalled = False
        self.loop = FastLoop()
        self._early_signal: Optional[int] = None

    def prepare(self) -> None:
        mp = self.mountpoint
        if not os.path.isdir(mp):
            raise MountError(f"mountpoint {mp} is not a directory")
        if os.path.ismount(mp):
            raise MountError(f"{mp} is already a mount point")
        with self.stack.pop_all() as stack:  # unwinds everything if set-up fails half-way
            o = self.options
            # the passphrases live in this process only, as long as the opening takes
            keys = self._keys or Keys.from_files(
                o.key_file, o.backing_key_files, o.allow_shared_key_file
            )
            self._keys = None
            image = Qcow2Image(
                self.image_path, read_only=self.read_only, backing_policy=o.backing, keys=keys
            )
            del keys
            stack.callback(image.close, flush=False)  # no-op after a clean Disk.close
            locks = _locks_for(image, self.read_only)
            for lk in locks:
                lk.acquire()
                stack.callback(lk.release)
            # after a corruption the image is read-only: become a read-only lock holder too
            image.on_read_only = locks[0].downgrade_to_read_only
            disk = Disk(
                image, self.options.bitmap_sync
            )  # writes to the image: only now that the locks are ours
            stack.callback(self._close_disk, disk)
            ops = QcowOperations(disk, self.options)
            # Only the users the options name get in: no allow_other unless asked for (root's
            # mount used to add it, and every local user could read the guest disk).
            try:
                pyfuse3.init(ops, mp, self.options.fuse_options(os.path.abspath(self.image_path)))
            except Exception as e:
                hint = ""
                if self.options.allow_other and os.getuid() != 0:
                    hint = " (allow_other for a non-root user needs 'user_allow_other' in /etc/fuse.conf)"
                raise MountError(f"cannot mount on {mp}: {e}{hint}") from None
            stack.callback(self._close_fuse)
            if image.chain_encrypted():
                # the sector cipher is one thread's (engine/encrypted_data.py)
                log.info("encrypted image: the metadata thread serves every request")
            else:
                if self.options.io_threads:
                    self._start_io(ops, disk, stack)
                self._start_lanes(ops, disk, stack)
            self.stack = stack.pop_all()

    def _start_lanes(self, ops: QcowOperations, disk: Disk, stack: contextlib.ExitStack) -> None:
        """Request lanes (fuse/lanes.py): one per CPU unless lanes=N says otherwise. They stop
        before the FUSE session closes and before the image does (the stack unwinds them
        first)."""
        count = self.options.lanes
        if count is None:
            count = len(os.sched_getaffinity(0))
        if count == 0:
            return
        why = lanes.available() or lanes.unsupported(disk)
        if why is not None:
            log.info("no request lanes: %s; the metadata thread serves every request", why)
            return
        fast = lanes.Lanes(disk, DISK, count)
        if not self.loop.can_attach_lanes():
            log.info(
                "no request lanes: this pyfuse3 has no main(wait_readable) hook "
                "(scripts/build-pyfuse3 builds one)"
            )
            return
        try:
            fast.start()
        except OSError as e:
            # e.g. a kernel without FUSE_DEV_IOC_CLONE (before 4.2), or no /dev/fuse to open
            log.warning(
                "no request lanes: %s; the metadata thread serves every request",
                e.strerror or e,
            )
            return
        stack.callback(fast.stop)
        self.loop.attach_lanes(fast)
        ops.lanes = fast

    def _start_io(self, ops: QcowOperations, disk: Disk, stack: contextlib.ExitStack) -> None:
        """Host data I/O threads, so several requests are served at once (fuse/concurrent_io.py); only
        with the patched pyfuse3's hook (scripts/build-pyfuse3), else one at a time."""
        threads = IoThreads(self.options.io_threads)
        stack.callback(threads.close)
        # a worker per thread and as many again queued behind them, one at the device
        if not self.loop.attach_io(threads, workers=2 * threads.size + 1):
            threads.close()
            log.info(
                "serving one request at a time: this pyfuse3 has no main(wait_readable) "
                "hook for several workers (scripts/build-pyfuse3 builds one)"
            )
            return
        ops.cio = cio = ConcurrentIo(
            disk, self.loop, threads, always=self.options.offload == "always"
        )
        stack.callback(
            lambda: log.info(
                "concurrent requests: %d waited for another's allocation or a drain, "
                "%d host I/O slow-downs seen",
                cio.waits,
                cio.slow_spells,
            )
        )

    def _close_fuse(self) -> None:
        try:
            # detach only when we were asked to stop; after fusermount3 -u the mount is gone
            pyfuse3.close(unmount=self.signalled)
        except Exception as e:
            log.warning("closing the FUSE session: %s", e)

    def _close_disk(self, disk: Disk) -> None:
        try:
            disk.close()
            log.info("%s: unmounted cleanly", self.image_path)
        except (OSError, QcowError) as e:
            self.clean = False
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            log.error(
                "%s: could not write the final metadata at unmount (%s); the image stays "
                "consistent but may leak clusters and its bitmaps stay in use: free the "
                "problem (e.g. disk space), then run 'qcowfs check --repair=leaks' on it",
                self.image_path,
                reason,
            )

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            # the receiver is in place before the first request is served: the request loop
            # may not yield to the scheduler again for a while (fuse/request_loop.py)
            await nursery.start(self._watch_signals)
            if not self.signalled:
                await self.loop.run()
            nursery.cancel_scope.cancel()

    async def _watch_signals(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            task_status.started()
            if self._early_signal is not None:
                self._stop(self._early_signal)
                return
            async for signum in signals:
                self._stop(signum)
                return

    def _stop(self, signum: int) -> None:
        log.info("received %s: unmounting", signal.Signals(signum).name)
        self.signalled = True
        self.loop.exit()

    def hold_signals(self) -> None:
        """From the moment the mount is announced until trio's receiver takes over, a stop
        signal is remembered instead of killing the daemon with the mount still attached."""

        def remember(signum: int, frame: Optional[FrameType]) -> None:
            self._early_signal = signum

        for s in _STOP_SIGNALS:
            signal.signal(s, remember)

    def serve(self) -> bool:
        """Serve until unmounted or signalled, then shut down; False if the final writes failed
        (the image then stays consistent, with leaks at worst, and its bitmaps stay in_use)."""
        try:
            trio.run(self._serve)
        finally:
            self.stack.close()
        return self.clean


def mount(
    image_path: str,
    mountpoint: str,
    options: MountOptions,
    ready: Optional[Callable[[Optional[str]], None]] = None,
    keys: Optional[Keys] = None,
) -> int:
    """Prepare and serve until unmounted. `ready(error_line or None)` is called once set-up ends.
    keys: the passphrases, if read already (cli: early_keys); else from the options."""
    read_only = options.read_only
    m = Mounted(image_path, mountpoint, options, keys)
    del keys
    try:
        m.prepare()
    except QcowError as e:
        if ready:
            ready(str(e))
        raise
    except OSError as e:
        err = QcowError(f"{e.strerror or e}", e.filename or image_path)
        if ready:
            ready(str(err))
        raise err from None
    log.info("%s: mounted on %s%s", image_path, mountpoint, " read-only" if read_only else "")
    if not HAS_FALLOCATE:
        log.warning(
            "this pyfuse3 has no fallocate/lseek handlers (qcowfs' patch, scripts/build-pyfuse3): discard "
            "and zeroing on disk.raw fail with EOPNOTSUPP and SEEK_DATA/SEEK_HOLE see one data extent"
        )
    m.hold_signals()
    if ready:
        ready(None)
    return 0 if m.serve() else 1

"""Shared support for qcowfs's tests and scripts, independent of pytest.

- support.proc: run a command (output captured, failures shown), wait for a condition by polling;
- support.oracles: QEMU's tools as the oracle: qemu-img, qemu-io, qemu-img check/info/convert,
  dirty bitmaps and allocation maps as QEMU serves them (qemu-nbd read with nbdinfo);
- support.mounts: the one lifecycle of a qcowfs daemon and its mount (start, wait until mounted,
  unmount with retries, kill, lazy detach of dead mounts, diagnostics);
- support.probes: raw qcow2 readers (header fields, extensions, L1/L2 entries, refcounts, the
  bitmap directory) written with struct from the specification, independent of qcowfs;
- support.images: the one qemu-img create test images are made with (create), the images more
  than one test file starts from, image bytes as a fuzzer's input (Blobs);
- support.syscalls: fallocate(2) through ctypes, and errno_of (the errno a call fails with);
- support.extents: byte ranges (merged);
- support.seeds: the seeds of randomized tests (fixed, shifted by QCOWFS_SEED);
- support.repo: the repository's root, the files a clone holds, the README's code blocks.

tests/ is on sys.path when pytest runs (rootdir conftest, no __init__.py in tests/); scripts put it
there themselves: `from support.oracles import qemu_img`.
"""

"""Support for qcowfs's tests that only the tests use, independent of pytest.

- support.images: the one qemu-img create test images are made with (create), the images more
  than one test file starts from, image bytes as a fuzzer's input (Blobs);
- support.syscalls: fallocate(2) through ctypes, and errno_of (the errno a call fails with);
- support.extents: byte ranges (merged);
- support.seeds: the seeds of randomized tests (fixed, shifted by QCOWFS_SEED);
- support.repo: the repository's root, the files a clone holds, the README's code blocks;
- support.dockerfile: the Dockerfile as data (its stages, the context .dockerignore leaves);
- support.patched_pyfuse3_fs: a one-file pyfuse3 file system for checking patches/ on a real mount.

What the tests share with the scripts (running commands, QEMU as the oracle, the mount lifecycle,
fio, raw qcow2 probes, the power-loss harness) is the package qcowfs_dev/ at the top of the
checkout: `from qcowfs_dev.oracles import qemu_img`.

tests/ is on sys.path when pytest runs (rootdir conftest, no __init__.py in tests/).
"""

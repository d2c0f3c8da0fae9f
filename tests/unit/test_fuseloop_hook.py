"""The fast FUSE request loop's private hook is used only on the pyfuse3 releases it was checked
against (qcowfs/fuse/request_loop.py, issue 11 item 7); that it really serves a mount there, and
what a mount does elsewhere: tests/mount/test_fuseloop.py."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "version, ok",
    [
        ("3.2.0", True),
        ("3.5.0", True),
        ("3.5.1rc1", True),
        ("3.1.1", False),
        ("3.6.0", False),
        ("4.0.0", False),
        ("?", False),
    ],
)
def test_only_verified_pyfuse3_releases_get_the_hook(monkeypatch, version, ok):
    import pyfuse3

    from qcowfs.fuse import request_loop as fuseloop

    monkeypatch.setattr(pyfuse3, "__version__", version)
    reason = fuseloop.hook_refusal()
    assert (reason is None) == ok, reason
    if not ok:
        assert version in reason

"""Seeds of the randomized tests: fixed, so that a failure replays, and shifted by QCOWFS_SEED to
try other ones (every test prints or names its seed)."""

from __future__ import annotations

import os
import zlib


def base_seed(default: int) -> int:
    """QCOWFS_SEED when set, else the test file's own default."""
    return int(os.environ.get("QCOWFS_SEED", str(default)))


def seed_for(name: str, base: int) -> int:
    """A per-test seed derived from a base seed (stable across runs and Python versions)."""
    return (base * 1000003 + zlib.crc32(name.encode())) & 0xFFFFFFFF

"""The passphrase options of every command that reads an encrypted image's data (mount, backup):
one definition, so that they mean the same everywhere (docs/encryption.md)."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from ..engine.encryption import Keys


def add_key_options(p: Any) -> None:
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help="the passphrase of an encrypted image: FILE's bytes exactly, as QEMU's "
        "--object secret,file=FILE,format=raw; also for encrypted backing images unless "
        "--backing-key-file. FILE must be readable by its owner only",
    )
    p.add_argument(
        "--backing-key-file",
        metavar="FILE",
        action="append",
        help="the passphrase of the encrypted backing image one level below (default: "
        "--key-file's); given again, of the next level down, and so on: the last one given "
        "serves every deeper level",
    )
    p.add_argument(
        "--allow-shared-key-file",
        action="store_true",
        help="accept key files that group or others can read",
    )


def keys_from(args: argparse.Namespace) -> Optional[Keys]:
    """The passphrases the options name (read now: a missing or shared file fails here)."""
    return Keys.from_files(
        args.key_file, args.backing_key_file or (), bool(args.allow_shared_key_file)
    )

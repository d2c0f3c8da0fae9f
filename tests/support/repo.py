"""The repository the tests run in: its root, what a fresh clone holds, the README's code blocks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tracked_files() -> list[str]:
    """What a fresh clone holds: the files git tracks."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True, check=True
    ).stdout
    return [f for f in out.split("\0") if f]


def readme_block(lang: str, first_line: str) -> str:
    """The body of the README's ```LANG block that starts with the line `# FIRST_LINE`."""
    text = (ROOT / "README.md").read_text()
    m = re.search(
        r"```" + re.escape(lang) + r"\n# " + re.escape(first_line) + r"\n(.*?)```", text, re.S
    )
    assert m, f"README has a ```{lang} block starting '# {first_line}'"
    return m.group(1)

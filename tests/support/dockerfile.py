"""The Dockerfile as data: its instructions by stage, and the build context `.dockerignore` leaves.

No Docker daemon (nor a base image registry) is reachable where the suite runs, so
tests/mount/test_dockerfile_build.py replays the Dockerfile's steps itself; this module does the parsing
(tests/unit/test_dockerfile.py checks the build context).

`.dockerignore` follows Docker's rules (moby's patternmatcher, which buildah/podman share):
each line is a pattern, cleaned like Go's filepath.Clean with a leading "/" dropped; `!` before
a pattern re-includes what it matches; the last pattern that matches a path decides; a pattern
that matches a directory matches everything under it; `*` and `?` never match "/", `**` matches
any number of directories.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts in the Dockerfile (1-based)


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions (comments and blank lines dropped;
    lines ending in a backslash joined with the next, comment lines inside them skipped)."""
    stages: list[Stage] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        ins = Instruction(keyword.upper(), args.strip(), start)
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            raise ValueError(f"Dockerfile line {start}: {ins.keyword} before any FROM")
        else:
            stages[-1].steps.append(ins)
    if pending:
        raise ValueError("Dockerfile ends inside a continued line")
    return stages


def copy_sources(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """A COPY's flags (--from=..., ...), its sources and its destination."""
    words = shlex.split(ins.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    if len(words) < 2:
        raise ValueError(f"Dockerfile line {ins.line}: COPY needs a source and a destination")
    return flags, words[:-1], words[-1]


def _clean(pattern: str) -> str:
    cleaned = posixpath.normpath(pattern.strip())
    return cleaned.lstrip("/") or "."


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match semantics plus `**`, as moby's patternmatcher compiles them."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i : i + 2] == "**":
                i += 2
                if pattern[i : i + 1] == "/":  # "**/" matches zero or more whole directories
                    out.append("(.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f".dockerignore: unterminated [ in {pattern!r}")
            out.append(pattern[i : end + 1])  # Go's classes, [^...] negated, read as Python's
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return re.compile("".join(out))


class DockerIgnore:
    """The patterns of a .dockerignore file and the question Docker asks of each context path."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str], str]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = _clean(line[1:] if negated else line)
            self.rules.append((negated, _pattern_regex(pattern), pattern))

    def excluded(self, path: str) -> bool:
        """Whether the context path (relative, "/"-separated) is left out of the build context:
        the last pattern matching it or one of its parent directories decides."""
        path = _clean(path)
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negated, regex, _ in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negated
        return result

    def context(self, files: list[str]) -> list[str]:
        """The files (relative paths) that reach the build context."""
        return [f for f in files if not self.excluded(f)]


def sources_in_context(source: str, context_files: list[str]) -> list[str]:
    """The context files a COPY source names: the file itself, or everything under a directory
    (sources may be globs, as COPY allows)."""
    src = _clean(source)
    if src == ".":
        return list(context_files)
    regex = _pattern_regex(src)
    return [f for f in context_files if regex.match(f) or any(regex.match(p) for p in _parents(f))]


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts))]


def load(root: Path) -> tuple[list[Stage], DockerIgnore]:
    """The repository's Dockerfile and .dockerignore."""
    ignore = root / ".dockerignore"
    return parse_dockerfile((root / "Dockerfile").read_text()), DockerIgnore(
        ignore.read_text() if ignore.exists() else ""
    )

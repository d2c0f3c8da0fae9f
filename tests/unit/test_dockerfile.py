"""The Dockerfile builds from a clean clone (issue 19): its build context.

`.dockerignore` matches as Docker's does, and every COPY source of the Dockerfile is in the
context it leaves of the clone's files. Replaying the Dockerfile's steps on this machine (and
mounting with the qcowfs it built): tests/mount/test_dockerfile_build.py.
"""

from __future__ import annotations

import pytest
from support.dockerfile import DockerIgnore, Stage, copy_sources, load, sources_in_context
from support.repo import ROOT, tracked_files


def _missing_copy_sources(stages: list[Stage], ignore: DockerIgnore, files: list[str]) -> list[str]:
    context = ignore.context(files)
    missing = []
    for stage in stages:
        for ins in stage.steps:
            if ins.keyword not in ("COPY", "ADD"):
                continue
            flags, sources, _ = copy_sources(ins)
            if "from" in flags:
                continue
            for src in sources:
                if not sources_in_context(src, context):
                    missing.append(f"line {ins.line}: {src}")
    return missing


# ---------------------------------------------------------------------- .dockerignore rules
@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        ("scripts", "scripts/build-pyfuse3", True),
        ("scripts\n!scripts/build-pyfuse3", "scripts/build-pyfuse3", False),
        ("scripts\n!scripts/build-pyfuse3", "scripts/bench", True),
        (
            "!scripts/build-pyfuse3\nscripts",
            "scripts/build-pyfuse3",
            True,
        ),  # the last match decides
        ("*.qcow2", "a.qcow2", True),
        ("*.qcow2", "d/a.qcow2", False),  # anchored at the context's root, as Docker does
        ("**/*.pyc", "a/b/c.pyc", True),
        ("**/*.pyc", "c.pyc", True),
        ("**/__pycache__", "qcowfs/__pycache__/x.cpython-311.pyc", True),
        ("/build", "build/lib/x", True),
        ("build", "qcowfs/build.py", False),
        ("qcowfs/*.p?", "qcowfs/fs.py", True),
        ("qcowfs/[a-e]*", "qcowfs/fs.py", False),
        ("qcowfs/[^a-e]*", "qcowfs/fs.py", True),
    ],
)
def test_dockerignore_matches_as_docker_does(patterns, path, excluded):
    assert DockerIgnore(patterns).excluded(path) is excluded


def test_every_copy_source_survives_dockerignore():
    stages, ignore = load(ROOT)
    files = tracked_files()
    assert _missing_copy_sources(stages, ignore, files) == []
    # the check can fail: the .dockerignore that broke `podman build` (it excluded scripts/ whole)
    broken = DockerIgnore(
        (ROOT / ".dockerignore").read_text().replace("!scripts/build-pyfuse3", "")
    )
    assert _missing_copy_sources(stages, broken, files) == [
        f"line {ins.line}: scripts/build-pyfuse3"
        for ins in stages[0].steps
        if ins.keyword == "COPY" and "scripts/build-pyfuse3" in ins.args
    ]

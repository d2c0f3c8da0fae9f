"""The Dockerfile builds from a clean clone (issue 19): its steps, replayed.

No Docker daemon or base image can be had where the suite runs, so the Dockerfile's steps are
replayed on this machine as far as it allows: the build context is what `.dockerignore` leaves
of the clone's files, every COPY source must be in it, every RUN runs for real (paths inside the
image mapped to a scratch directory, `python` being the base image's interpreter), except the
apt-get steps, whose packages must be Debian 12 packages installed here (scripts/setup installs
them). Then the image's ENTRYPOINT + CMD runs, and the qcowfs it built mounts, writes and
unmounts an image that `qemu-img check` passes. The build context itself (`.dockerignore`, COPY
sources): tests/unit/test_dockerfile.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.dockerfile import Stage, copy_sources, load
from support.repo import ROOT, tracked_files

from qcowfs_dev.mounts import FUSE_AVAILABLE, detach, is_mounted
from qcowfs_dev.oracles import assert_clean, qemu_img
from qcowfs_dev.proc import run

_APT_INSTALL = re.compile(r"apt-get install ((?:\S+\s*)+?)(?:&&|$)")


def _apt_packages(command: str) -> list[str]:
    """The packages an apt-get RUN installs (its words after `install` that are not options)."""
    m = _APT_INSTALL.search(command)
    assert m, f"an apt-get RUN without apt-get install: {command}"
    return [w for w in m.group(1).split() if not w.startswith("-")]


def _installed(package: str) -> bool:
    p = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], capture_output=True, text=True
    )
    return p.stdout.startswith("ii")


# Where the Dockerfile's RUN steps write in the image; a RUN naming any other absolute path fails
# the test rather than touch this machine (teach the map first).
IMAGE_PATHS = ("/opt/qcowfs", "/usr/local/bin", "/mnt", "/images")


class Replay:
    """The image's file system, mapped onto a scratch directory: the image paths the Dockerfile
    names become paths under `root`. The stages share it (a venv is not relocatable, so the venv
    the build stage makes at /opt/qcowfs is where the runtime stage's COPY --from puts it)."""

    def __init__(self, root: Path, python: str) -> None:
        self.root = root
        self.workdir = root
        self.shims = root / ".shims"
        self.shims.mkdir(parents=True)
        # the base image's `python` (python:3.11-slim has it; Debian only has python3)
        (self.shims / "python").symlink_to(python)
        self.mapped: set[str] = set(IMAGE_PATHS)
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []

    def path(self, image_path: str) -> Path:
        if not image_path.startswith("/"):
            return self.workdir / image_path
        self.mapped.add(image_path.rstrip("/") or "/")
        return self.root / image_path.lstrip("/")

    def substitute(self, command: str) -> str:
        """The command with every image path it names mapped to the scratch directory (longest
        first; only where a path starts); AssertionError for any other absolute path."""
        named = re.findall(r"(?<![\w./-])/[\w./-]*", command)
        unmapped = [
            p for p in named if not any(p == m or p.startswith(m + "/") for m in self.mapped)
        ]
        assert not unmapped, (
            f"RUN names {unmapped}, which this test does not map: add it to IMAGE_PATHS"
        )
        for image_path in sorted(self.mapped, key=len, reverse=True):
            host = str(self.root / image_path.lstrip("/"))
            command = re.sub(
                rf"(?<![\w./-]){re.escape(image_path)}(?=[/\s'\";&|)]|$)", host, command
            )
        return command

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if ".venv" not in p]
        env["PATH"] = os.pathsep.join([str(self.shims), str(self.root / "usr/local/bin"), *path])
        return env


def _replay_stage(stage: Stage, replay: Replay, context: Path) -> None:
    replay.workdir = replay.root
    for ins in stage.steps:
        if ins.keyword == "WORKDIR":
            replay.workdir = replay.path(ins.args)
            replay.workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            flags, sources, dest = copy_sources(ins)
            for src in sources:
                if "from" in flags:  # the same scratch root: it must be there already
                    assert replay.path(src).exists(), (
                        f"line {ins.line}: COPY --from={flags['from']} {src}: not built"
                    )
                    assert replay.path(src) == replay.path(dest), (
                        f"line {ins.line}: COPY --from to another path"
                    )
                    continue
                source = context / src
                assert source.exists(), f"line {ins.line}: COPY {src}: not in the build context"
                target = replay.path(dest)
                if source.is_dir():
                    shutil.copytree(source, target, dirs_exist_ok=True)
                else:
                    if dest.endswith("/"):
                        target = target / source.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
        elif ins.keyword == "RUN":
            if "apt-get" in ins.args:
                # the base image's packages: here they must be installed, by their Debian 12 names
                missing = [p for p in _apt_packages(ins.args) if not _installed(p)]
                assert not missing, (
                    f"line {ins.line}: Debian packages not installed here: {missing}"
                )
                continue
            (replay.root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
            command = replay.substitute(ins.args)
            p = subprocess.run(
                ["sh", "-c", command],
                cwd=replay.workdir,
                env=replay.env(),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=900,
            )
            assert p.returncode == 0, (
                f"line {ins.line}: RUN failed ({p.returncode}):\n{command}\n{p.stdout}\n{p.stderr}"
            )
        elif ins.keyword in ("ENTRYPOINT", "CMD"):
            words = json.loads(ins.args) if ins.args.startswith("[") else ["sh", "-c", ins.args]
            setattr(replay, ins.keyword.lower(), words)
        else:
            raise AssertionError(
                f"line {ins.line}: this test does not know how to replay {ins.keyword}; teach it"
            )


@pytest.mark.slow
@pytest.mark.skipif(
    not FUSE_AVAILABLE, reason="/dev/fuse or fusermount3 missing: FUSE tests cannot run here"
)
def test_dockerfile_steps_build_a_working_qcowfs(tmp_path):
    stages, ignore = load(ROOT)
    context = tmp_path / "context"
    for f in ignore.context(tracked_files()):
        (context / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, context / f)
    python = getattr(sys, "_base_executable", sys.executable)
    replay = Replay(tmp_path / "image", python)
    for stage in stages:
        assert stage.base == stages[0].base, (
            "every stage starts from the same base image (one python)"
        )
        _replay_stage(stage, replay, context)
    entry = [
        str(
            replay.path(replay.entrypoint[0])
            if "/" in replay.entrypoint[0]
            else replay.path("/usr/local/bin") / replay.entrypoint[0]
        ),
        *replay.entrypoint[1:],
        *replay.cmd,
    ]
    help_run = run(entry, env=replay.env())
    assert "usage" in help_run.stdout.lower(), help_run.stdout
    qcowfs = entry[0]
    version = run(
        [
            replay.path("/opt/qcowfs") / "bin/python",
            "-c",
            "import pyfuse3; print(pyfuse3.__version__)",
        ]
    )
    assert "+qcowfs" in version.stdout, version.stdout

    # what the image is for: mount, write, unmount (a clean image)
    img, mnt = tmp_path / "x.qcow2", tmp_path / "mnt"
    mnt.mkdir()
    qemu_img("create", "-f", "qcow2", img, "16M")
    qemu_img("bitmap", "--add", img, "b0")
    try:
        run([qcowfs, "mount", img, mnt], env=replay.env())
        assert os.path.ismount(mnt)
        with open(mnt / "disk.raw", "r+b") as f:
            f.seek(1 << 20)
            f.write(b"docker" * 1000)
        run([qcowfs, "umount", mnt], env=replay.env())
    finally:
        if is_mounted(mnt):
            detach(mnt)
    assert_clean(img)
    out = run(["qemu-io", "-r", "-c", "read -P 0x64 1048576 1", img])  # 'd'
    assert "read 1/1 bytes" in out.stdout, out.stdout

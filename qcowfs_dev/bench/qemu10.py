"""Target qemu10's QEMU: qemu-storage-daemon 10.0 from Debian bookworm-backports, unpacked into a
cache directory next to (never over) the system's QEMU."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from .host import BenchError, log, run

__all__ = ["QEMU10_DIR", "QEMU10_SUITE", "Qemu10"]

QEMU10_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcowfs-bench", "qemu-10"
)
QEMU10_SUITE = "bookworm-backports"


class Qemu10:
    """qemu-storage-daemon 10.0 from Debian bookworm-backports, unpacked into a cache directory
    next to (never over) the system's QEMU: apt-get with a private source list, lists and
    archive cache downloads qemu-utils (and any library dependency this system lacks or has too
    old), dpkg -x unpacks them into DIR/root. Done once; later runs reuse DIR/root."""

    def __init__(self, cache_dir: str):
        self.dir = os.path.abspath(cache_dir)
        self.root = os.path.join(self.dir, "root")
        self.binary = ""
        self.env: dict[str, str] = {}
        self.version = ""

    def find(self) -> str | None:
        # the unpacked root, or a DIR that is itself an install prefix (--qemu10-dir /opt/qemu-10)
        for d in (
            os.path.join(self.root, "usr", "bin"),
            os.path.join(self.dir, "usr", "bin"),
            os.path.join(self.dir, "bin"),
        ):
            b = os.path.join(d, "qemu-storage-daemon")
            if os.access(b, os.X_OK):
                return b
        return None

    def apt(
        self, tool: str, *args: str, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        opts = [
            f"Dir::Etc::SourceList={os.path.join(self.dir, 'sources.list')}",
            "Dir::Etc::SourceParts=/dev/null",
            f"Dir::State::Lists={os.path.join(self.dir, 'lists')}",
            f"Dir::Cache={os.path.join(self.dir, 'cache')}",
        ]
        if os.geteuid() == 0:
            opts.append("APT::Sandbox::User=root")  # _apt cannot write into a cache under /root
        cmd = [tool, "-q"] + [x for o in opts for x in ("-o", o)] + list(args)
        return run(cmd, cwd=cwd)

    def install(self) -> None:
        import fcntl

        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, ".lock"), "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)  # another bench (another worktree) may be installing
            if self.find():
                return
            log(
                f"bench: qemu10: installing qemu-storage-daemon from {QEMU10_SUITE} into {self.root} (once)"
            )
            for d in ("lists/partial", "cache/archives/partial"):
                os.makedirs(os.path.join(self.dir, d), exist_ok=True)
            with open(os.path.join(self.dir, "sources.list"), "w") as f:
                f.write(f"deb http://deb.debian.org/debian {QEMU10_SUITE} main\n")
            self.apt("apt-get", "update")
            show = self.apt("apt-cache", "show", f"qemu-utils/{QEMU10_SUITE}").stdout
            pkgs = ["qemu-utils"] + self.missing_deps(show)
            debs = tempfile.mkdtemp(prefix="debs.", dir=self.dir)
            tmp_root = tempfile.mkdtemp(prefix="root.", dir=self.dir)
            try:
                self.apt(
                    "apt-get",
                    "download",
                    *[f"{p}/{QEMU10_SUITE}" if p == "qemu-utils" else p for p in pkgs],
                    cwd=debs,
                )
                for deb in sorted(os.listdir(debs)):
                    if deb.endswith(".deb"):
                        run(["dpkg", "-x", os.path.join(debs, deb), tmp_root])
                os.rename(
                    tmp_root, self.root
                )  # complete or absent: an interrupted install is redone
            finally:
                shutil.rmtree(debs, ignore_errors=True)
                shutil.rmtree(tmp_root, ignore_errors=True)
            log(f"bench: qemu10: unpacked {', '.join(pkgs)}")

    @staticmethod
    def missing_deps(show: str) -> list[str]:
        """Packages of qemu-utils' Depends (first alternatives) this system lacks or has older than required."""
        deps = ""
        for line in show.splitlines():
            if line.startswith("Depends:"):
                deps = line.partition(":")[2]
                break
        out = []
        for group in deps.split(","):
            alt = group.split("|")[0].strip()
            if not alt:
                continue
            name, _, rest = alt.partition(" ")
            name = name.split(":")[0]
            have = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status} ${Version}", name],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            status = have.stdout.split()
            if have.returncode != 0 or status[:3] != ["install", "ok", "installed"]:
                out.append(name)
            elif rest.strip().startswith("("):
                op, ver = rest.strip().strip("()").split()
                ok = (
                    subprocess.run(["dpkg", "--compare-versions", status[3], op, ver]).returncode
                    == 0
                )
                if not ok:
                    out.append(name)
        return out

    def setup(self) -> None:
        """Install (if needed) and check: the binary runs, is 10.x, and aio=io_uring opens and does I/O."""
        if not self.find():
            self.install()
        self.binary = self.find() or ""
        if not self.binary:
            raise BenchError(f"no qemu-storage-daemon under {self.dir} after installing")
        self.env = dict(os.environ)
        libdirs = [
            d
            for d in (
                os.path.join(self.root, "usr", "lib", "x86_64-linux-gnu"),
                os.path.join(self.root, "lib", "x86_64-linux-gnu"),
                os.path.join(self.root, "usr", "lib"),
            )
            if os.path.isdir(d) and any(".so" in f for f in os.listdir(d))
        ]
        if libdirs:
            self.env["LD_LIBRARY_PATH"] = os.pathsep.join(
                libdirs + [self.env.get("LD_LIBRARY_PATH", "")]
            ).rstrip(os.pathsep)
        ldd = subprocess.run(
            ["ldd", self.binary],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        missing = [ln.split()[0] for ln in ldd.stdout.splitlines() if "not found" in ln]
        if missing:
            raise BenchError(f"{self.binary} lacks libraries: {', '.join(missing)}")
        self.version = run([self.binary, "--version"], env=self.env).stdout.splitlines()[0]
        if " version 10." not in self.version:
            raise BenchError(f"{self.binary} is not QEMU 10: {self.version}")
        # aio=io_uring must work (liburing linked, io_uring allowed by the kernel): qemu-io of the same build
        qemu_io = os.path.join(os.path.dirname(self.binary), "qemu-io")
        if os.access(qemu_io, os.X_OK):
            with tempfile.NamedTemporaryFile(dir=self.dir, suffix=".raw") as probe:
                probe.truncate(1 << 20)
                probe.flush()
                run(
                    [
                        qemu_io,
                        "--image-opts",
                        "-c",
                        "write -P 0x5a 0 4k",
                        "-c",
                        "read -P 0x5a 0 4k",
                        f"driver=file,filename={probe.name},aio=io_uring",
                    ],
                    env=self.env,
                )

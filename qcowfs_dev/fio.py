"""fio as a load generator for tests: job files written from Python, replayed I/O logs for
deterministic offsets, and the JSON result checked for errors.

fio's own placement (rw=randwrite with bssplit, zonemode=strided) does not keep concurrent jobs
on disjoint blocks, so tests that need a reproducible end state give each job an explicit list of
writes (`write_iolog`, replayed with read_iolog + replay_no_stall at the job's iodepth). Note that
fio does not verify replayed writes (verify=pattern only fills the buffers); jobs that fio should
verify use its own sequential/strided placement (rw=write:SKIP) instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from .proc import run

__all__ = ["write_iolog", "job_file", "run_fio", "fio_header_ok"]

VERIFY_MAGIC = 0xACCA  # fio's struct verify_header.magic (verify.h)


def write_iolog(path: Path, target: Path, ops: Iterable[tuple], action: str = "write") -> Path:
    """An iolog v2 file replaying ACTION (offset, length) on TARGET in the given order."""
    lines = ["fio version 2 iolog", f"{target} add", f"{target} open"]
    lines += [f"{target} {action} {off} {length}" for off, length in ops]
    lines.append(f"{target} close")
    path.write_text("\n".join(lines) + "\n")
    return path


def job_file(path: Path, global_opts: dict, jobs: dict) -> Path:
    """An fio job file: [global] then one section per job (name -> {option: value})."""
    out = ["[global]"] + [f"{k}={v}" for k, v in global_opts.items()]
    for name, opts in jobs.items():
        out.append(f"[{name}]")
        out += [f"{k}={v}" for k, v in opts.items()]
    path.write_text("\n".join(out) + "\n")
    return path


def run_fio(jobfile: Path, *args: str, timeout: Optional[float] = 300, check: bool = True) -> dict:
    """fio --output-format=json JOBFILE ARGS; with check, any job error (or exit status) fails with
    fio's stderr (verify failures are reported there)."""
    p = run(
        ["fio", "--output-format=json", *args, jobfile],
        check=False,
        timeout=timeout,
        cwd=jobfile.parent,
    )
    out = p.stdout
    start = out.find("{")  # fio may print notes before the JSON document
    try:
        res = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        res = {}
    res["rc"] = p.returncode
    res["stderr"] = p.stderr
    if check:
        errs = [(j["jobname"], j["error"]) for j in res.get("jobs", []) if j.get("error")]
        assert p.returncode == 0 and not errs and res.get("jobs"), (
            f"fio {jobfile} exited {p.returncode}, job errors {errs}:\n{p.stderr.strip()[-3000:]}\n"
            f"{jobfile.read_text()}"
        )
    return res


def fio_header_ok(block: bytes, offset: int, length: int) -> bool:
    """BLOCK starts with the verify header fio writes for a block of LENGTH at OFFSET (magic, len,
    offset: struct verify_header, little endian): the write landed where fio put it."""
    if len(block) < 24:
        return False
    return (
        int.from_bytes(block[0:2], "little") == VERIFY_MAGIC
        and int.from_bytes(block[4:8], "little") == length
        and int.from_bytes(block[16:24], "little") == offset
    )

"""The numbers of a run: the order of the repeats, medians of the repeats, ratios between targets.

results: job -> target -> [one fio result per repeat]; medians: job -> target -> {key: median}.
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Optional, Sequence, TypeVar

__all__ = ["MEDIAN_KEYS", "Results", "Medians", "rotated", "medians", "ratio_pairs", "bw_ratio"]

T = TypeVar("T")
Results = dict[str, dict[str, list[dict[str, float]]]]
Medians = dict[str, dict[str, dict[str, float]]]

#: what the median is taken of (a run's other numbers, io_bytes and runtime_ms, stay in "runs");
#: cpu_busy only where every run has it (runs from before issue 21 do not)
MEDIAN_KEYS = ("iops", "bw_bytes", "clat_mean_us", "clat_p99_us", "cpu_busy")


def rotated(targets: Sequence[T], r: int) -> list[T]:
    """Repeat r starts with target r (mod n): no target is always the first after a set-up."""
    k = r % len(targets)
    return list(targets[k:]) + list(targets[:k])


def medians(results: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]) -> Medians:
    """The median of each key over the repeats of each job and target (targets without a run left out)."""
    out: Medians = {}
    for job, per in results.items():
        out[job] = {}
        for t, runs in per.items():
            if runs:
                out[job][t] = {
                    k: statistics.median(r[k] for r in runs)
                    for k in MEDIAN_KEYS
                    if all(k in r for r in runs)
                }
    return out


def ratio_pairs(cols: Sequence[str], labels: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(label, numerator, denominator) of the ratios printed and drawn: qcowfs against each other target."""
    pairs = [
        (f"qcowfs/{labels.get(d, d)}", "qcowfs", d)
        for d in ("qemu", "qemu10", "ceiling", "baseline")
    ]
    pairs.append(("intent/close", "intent", "qcowfs"))
    pairs.append(("LUKS/qsd LUKS", "luks", "luks-qemu10"))
    return [r for r in pairs if r[1] in cols and r[2] in cols]


def bw_ratio(per: Mapping[str, Mapping[str, Any]], num: str, den: str) -> Optional[float]:
    """MB/s of target NUM over MB/s of target DEN in one job's medians; None if either is missing
    (or DEN did nothing)."""
    q, o = per.get(num), per.get(den)
    return q["bw_bytes"] / o["bw_bytes"] if q and o and o["bw_bytes"] else None

"""Byte ranges as the tests compute them (independently of qcowfs)."""

from __future__ import annotations


def merged(intervals) -> list:
    """[start, end) intervals sorted, overlapping and touching ones merged: [[start, end], ...]."""
    out: list = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out

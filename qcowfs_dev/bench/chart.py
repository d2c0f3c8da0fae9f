"""The run's chart (PNG, matplotlib): MB/s per job and target, and the ratios of the table."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .jobs import ALL_TARGETS, FRESH
from .stats import Medians, bw_ratio, ratio_pairs

__all__ = ["plot"]


def plot(
    med: Medians, targets: Sequence[str], path: str, title: str, labels: Mapping[str, str]
) -> bool:
    """Horizontal bars, one group per job (top to bottom in run order): MB/s on a log scale left,
    the ratios of the table right (bars from 1: right of the line qcowfs is faster). False if
    matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    jobs = list(med)
    cols = [t for t in ALL_TARGETS if t in targets]
    ratios = ratio_pairs(cols, labels)
    colors: dict[Any, Any] = {
        "qcowfs": "#1f77b4",
        "intent": "#2ca02c",
        "baseline": "#9467bd",
        "qemu": "#ff7f0e",
        "qemu10": "#d62728",
        "ceiling": "#7f7f7f",
        "stock": "#bcbd22",
    }
    fs = 7 if len(jobs) * len(cols) <= 40 else 6
    fig, axes = plt.subplots(
        1,
        2 if ratios else 1,
        figsize=(13 if ratios else 8, max(4, 0.18 * len(jobs) * len(cols) + 1.5)),
        sharey=True,
        gridspec_kw={"width_ratios": [3, 2]} if ratios else None,
        squeeze=False,
    )
    ax = axes[0][0]

    def grouped(
        ax: Any,
        series: Sequence[tuple[str, Any]],
        value: Callable[[str, Any], float],
        bottom: float = 0.0,
    ) -> None:
        h = 0.8 / max(1, len(series))
        for i, (lbl, key) in enumerate(series):
            ys = [k + (i - (len(series) - 1) / 2) * h for k in range(len(jobs))]
            vals = [value(j, key) for j in jobs]
            bars = ax.barh(
                ys,
                [v - bottom if v else 0 for v in vals],
                h,
                left=bottom,
                label=lbl,
                color=colors.get(key),
            )
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(
                        f"{v:.0f}" if bottom == 0 else f"{v:.2f}",
                        (v, b.get_y() + b.get_height() / 2),
                        va="center",
                        ha="left" if v >= bottom else "right",
                        fontsize=fs,
                        xytext=(2 if v >= bottom else -2, 0),
                        textcoords="offset points",
                    )

    grouped(
        ax,
        [(labels.get(t, t), t) for t in cols],
        lambda j, t: med[j][t]["bw_bytes"] / 1e6 if t in med[j] else 0,
    )
    for k in range(1, len(jobs)):
        if jobs[k].endswith(FRESH) and not jobs[k - 1].endswith(FRESH):
            for a in axes[0]:
                a.axhline(
                    k - 0.5, color="black", linewidth=0.6, linestyle="--"
                )  # filled image above, fresh below
    ax.set_yticks(range(len(jobs)))
    ax.set_yticklabels(jobs)
    ax.invert_yaxis()
    ax.set_xscale("log")
    right = max((med[j][t]["bw_bytes"] / 1e6 for j in jobs for t in cols if t in med[j]), default=1)
    ax.set_xlim(right=right * 3)  # room for the value labels
    ax.set_title("MB/s (median, log scale)", fontsize=9)
    from matplotlib.transforms import ScaledTranslation

    # legends under the tick labels: inside the axes they would hide bars
    below: dict[str, Any] = dict(
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, 0),
        frameon=False,
        bbox_transform=ax.transAxes + ScaledTranslation(0, -18 / 72, fig.dpi_scale_trans),
    )
    ax.legend(ncol=len(cols), **below)
    ax.grid(axis="x", which="both", alpha=0.3)
    if ratios:
        ax2 = axes[0][1]

        def ratio(j: str, pair: tuple[str, str, str]) -> float:
            return bw_ratio(med[j], pair[1], pair[2]) or 0

        colors.update({r: colors.get(r[2] if r[1] == "qcowfs" else r[1]) for r in ratios})
        grouped(ax2, [(r[0], r) for r in ratios], ratio, bottom=1.0)
        ax2.axvline(1.0, color="black", linewidth=0.8)
        ax2.set_xscale("log")
        vals = [ratio(j, r) for j in jobs for r in ratios if ratio(j, r)]
        lo, hi = min(vals + [1.0]), max(vals + [1.0])
        ax2.set_xlim(lo / 1.6, hi * 1.6)
        ax2.set_title("ratio of MB/s (log scale; > 1: the first named is faster)", fontsize=9)
        below["bbox_transform"] = ax2.transAxes + ScaledTranslation(
            0, -18 / 72, fig.dpi_scale_trans
        )
        ax2.legend(ncol=2, **below)
        ax2.grid(axis="x", which="major", alpha=0.3)
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

        ticks = [
            t
            for t in (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20)
            if lo / 1.6 <= t <= hi * 1.6
        ]
        ax2.xaxis.set_major_locator(FixedLocator(ticks))
        ax2.xaxis.set_major_formatter(ScalarFormatter())
        ax2.xaxis.set_minor_locator(NullLocator())
        ax2.xaxis.set_minor_formatter(NullFormatter())
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, int(fig.get_figwidth() * 13))), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True

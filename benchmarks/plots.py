"""matplotlib figures of the benchmark reports (the `bench` extra): curves per series and labelled scatters.

Every benchmark script draws through these two functions, so figures share one look; `protocol/pareto.py` draws
the Pareto report the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(panels: Sequence[tuple[str, str, dict[str, list[tuple[float, float]]]]], path: Path, xlabel: str,
           logx: bool = True) -> Path:
    """One panel per (title, y label, {series: [(x, y), ...]}); series share colours across panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 4.2), squeeze=False)
    names = list(dict.fromkeys(name for _, _, series in panels for name in series))
    cmap = plt.get_cmap("tab20")  # more than ten series: tab20's 20 colours instead of the default cycle's 10
    colour = {name: f"C{i}" if len(names) <= 10 else cmap(i % 20) for i, name in enumerate(names)}
    handles = {}
    for ax, (title, ylabel, series) in zip(axes[0], panels, strict=True):
        for name, pts in series.items():
            pts = sorted(pts)
            (handles[name],) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=colour[name],
                                       label=name)
        if logx:
            ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend([handles[n] for n in names], names, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def labelled_scatter(points: Sequence[tuple[str, float, float]], path: Path, title: str, xlabel: str, ylabel: str,
                     line: Sequence[str] = ()) -> Path:
    """Points (label, x, y), each labelled; the points named in `line` are joined in x order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([p[1] for p in points], [p[2] for p in points], s=18, color="C0", zorder=3)
    joined = sorted((p[1], p[2]) for p in points if p[0] in line)
    if len(joined) > 1:
        ax.plot([p[0] for p in joined], [p[1] for p in joined], "-", color="C3", lw=1, zorder=2)
    for name, x, y in points:
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

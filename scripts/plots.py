"""The paper's figures from summary rows (scripts/runs.summarize): scaling curves and the Fig. 8 residual.

plot_scaling: ES, GS, LS (and CounterFact's scores) against m on a log2 axis, a line per editor/variant, mean
line, std shaded, the level before editing dashed (Figs. 4-7). plot_residual: the mean residual
||S* u - d|| / ||d|| against m, log axes (Fig. 8). Files only (matplotlib's Agg backend).
"""
from pathlib import Path

import matplotlib
import matplotlib.ticker  # noqa: F401  (tick formatters)

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts.runs import COUNTERFACT, METRICS, label, seeds_title  # noqa: E402

UNITS = {"ES": "edit success", "GS": "generalisation success", "LS": "locality success"}


def _lines(rows: list[dict], stat: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """label -> (m, mean, std) sorted by m, for the rows that have `stat`; the std is the rows' own spread
    (summarize's `spread`: over seeds or over validation groups; 0 where a row lacks one)."""
    several = len({(r["model"], r["data"]) for r in rows}) > 1
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r[f"{stat}_mean"] is not None:
            lines.setdefault(label(r, several), []).append(r)
    out = {}
    for name, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["m"])
        out[name] = tuple(np.array([r.get(k) or 0.0 for r in rs], dtype=float)
                          for k in ("m", f"{stat}_mean", f"{stat}_std"))
    return out


def _axis(ax, stat: str, log_y: bool = False) -> None:
    """log2 x axis with plain tick labels (16, 32, ...); y label; grid."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("number of edits m")
    ax.set_ylabel(UNITS.get(stat, stat))
    ax.grid(alpha=0.3)


def _legend_outside(fig, axes) -> None:
    """One legend for the figure, below the axes, so that it covers no data (LS sits near 1)."""
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))


def plot_scaling(rows: list[dict], title: str, path: Path) -> None:
    """ES, GS, LS (and CounterFact's scores, where the runs have them) against m (log2), one line per
    editor/variant, mean +- std shaded (the rows' spread: over seeds, or over every validation group of every
    seed); before editing dashed (runs.levels_before)."""
    stats = METRICS + tuple(s for s in COUNTERFACT if any(r[f"{s}_mean"] is not None for r in rows))
    fig, axes = plt.subplots(len(stats) // 3, 3, figsize=(13, 4.2 * (len(stats) // 3)), sharex=True, squeeze=False)
    axes = axes.ravel()
    for ax, stat in zip(axes, stats):
        for name, (m, mean, std) in _lines(rows, stat).items():
            ax.plot(m, mean, marker="o", ms=3, label=name)
            ax.fill_between(m, mean - std, mean + std, alpha=0.2)
        pre = dict(sorted((r["m"], r[f"pre_{stat}_mean"]) for r in rows if r[f"pre_{stat}_mean"] is not None))
        if pre:  # the edited model's own level, the reference every editor starts from (one per m)
            ax.plot(list(pre), list(pre.values()), "k--", lw=1, label="before editing")
        _axis(ax, stat)
        ax.set_title(stat)
        ax.set_ylim(0, 1.02)
    n = "/".join(map(str, sorted({r["n"] for r in rows})))
    fig.suptitle(seeds_title(rows, title) if rows[0]["spread"] == "seeds" else
                 f"{title} (mean over {n} seed{'s' if n != '1' else ''}, shaded ± std over validation groups)")
    _legend_outside(fig, axes)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_residual(rows: list[dict], title: str, path: Path) -> None:
    """Fig. 8: mean residual ||S* u - d|| / ||d|| against m (log2 x, log y), mean +- std shaded."""
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    for name, (m, mean, std) in _lines(rows, "residual").items():
        ax.plot(m, mean, marker="o", ms=3, label=name)
        ax.fill_between(m, np.maximum(mean - std, mean * 1e-3), mean + std, alpha=0.2)  # log axis: stay > 0
    _axis(ax, "mean residual ||S*u - d|| / ||d||", log_y=True)
    fig.suptitle(seeds_title(rows, title), fontsize=10)
    _legend_outside(fig, [ax])
    fig.savefig(path, dpi=120)
    plt.close(fig)

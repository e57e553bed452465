"""Aggregate a sweep: every results.json under a directory -> CSV, the paper's plots and tables.

python scripts/aggregate.py SWEEP_DIR [--out DIR]     (DIR defaults to SWEEP_DIR)

Runs are grouped by (paper_result, model, data, editor, variant, m, the m a hyper-network evaluated at another m
was trained at); seeds are the repeats. Such rows are labelled "(trained at m = X)". Writes
- summary.csv: n, seeds, mean and std (over seeds, numpy's ddof=0) of ES, GS, LS, residual, time_s
  and peak_memory_mb per group, and the mean ES, GS, LS before editing (pre_*), rounded to 4 decimals;
- <result>.png per scaling curve (ES, GS, LS against m on a log2 axis, mean line, std shaded, the
  level before editing dashed); a result with a single m is a table, <result>.md, instead;
  <result>_residual.png when the runs recorded the Fig. 8 residual; fig8_residual.png for Fig. 8;
- table1.md and table2.md in the layout of the paper's Tables 1 and 2 (mean (std), in %), and
  toy_table.md in Table 1's layout for the default experiment (scripts/toy_table.sh);
- real_lm_zsre.md in that layout, one column group per m (a row per editor, "Before editing" first), beside
  its curve real_lm_zsre.png (scripts/real_lm.sh);
- massive_counterfact.md: a row per (m, editor) with ES/GS/LS, CounterFact's efficacy, paraphrase and
  neighborhood scores, the groups, wall and CPU time, beside massive_counterfact.png, six panels against m
  (scripts/massive_counterfact.sh). CounterFact runs carry those scores in every table and plot.
A results.json that cannot be read or lacks a field stops it with the file and the field (exit 2).
"""
import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.ticker  # noqa: F401  (tick formatters)

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRICS = ("ES", "GS", "LS")
COUNTERFACT = ("efficacy", "paraphrase", "neighborhood")  # data=counterfact runs only (model/lm.counterfact_scores)
OPTIONAL = COUNTERFACT + ("residual", "cpu_time_s", "valid_groups")  # in some results.json files only
STATS = METRICS + COUNTERFACT + ("residual", "time_s", "cpu_time_s", "peak_memory_mb", "valid_groups")
TABLES = ("table1", "table2", "toy_table", "real_lm_zsre", "massive_counterfact")  # paper_result values written as Markdown tables ...
PLOTTED_TABLES = ("real_lm_zsre", "massive_counterfact")  # ... and, for these, as a curve over m as well
VARIANTS = {"sum": "Sum param. shifts", "no_reg": "No regularization", "first_ffn": "Edit first FC in FFN",
            "all_tokens": "Cache all tokens", "none": "MALMEN"}  # Table 1 row order, MALMEN last
EDITORS = {"malmen": "MALMEN", "mend": "MEND", "ft": "FT", "memit": "MEMIT", "emmet": "EMMET",
           "locft_bf": "LocFT-BF"}


class AggregateError(ValueError):
    """A results.json that cannot be aggregated: names the file and the field."""

    def __init__(self, path: Path, field: str | None, msg: str):
        super().__init__(f"{path}" + (f": field '{field}'" if field else "") + f": {msg}")


@dataclass(frozen=True)
class Run:
    """The numbers of one results.json that the aggregate needs."""

    path: Path
    result: str  # paper_result, or <model>_<data> for runs outside an experiment config
    model: str
    data: str
    editor: str
    variant: str
    m: int
    seed: int
    stats: dict  # STATS -> float (residual only for MALMEN/MEND runs)
    pre_edit: dict | None = None  # METRICS -> float before editing (None in results.json files without it)
    environment: dict | None = None  # where and when it ran (util.run_environment; None: not recorded)
    config: dict | None = None  # the resolved config
    trained_m: int | None = None  # the m its hyper-network was meta-trained at, when not m (editor.allow_other_m)

    @property
    def key(self) -> tuple:
        return self.result, self.model, self.data, self.editor, self.variant, self.m, self.trained_m


def _field(obj: dict, dotted: str, path: Path, kind: type | tuple):
    """obj[a][b]... for dotted 'a.b', checked to be of `kind`."""
    value = obj
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise AggregateError(path, dotted, "missing")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AggregateError(path, dotted, f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def read_run(path: Path) -> Run:
    """One results.json as a Run; AggregateError naming the file and field if it is unusable."""
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AggregateError(path, None, f"cannot read JSON ({err})") from err
    if not isinstance(res, dict):
        raise AggregateError(path, None, "not a JSON object")
    num = (int, float)
    model, data = _field(res, "config.model.name", path, str), _field(res, "config.data.name", path, str)
    if "paper_result" not in res.get("config", {}):
        raise AggregateError(path, "config.paper_result", "missing")
    result = res["config"]["paper_result"] or f"{model}_{data}"
    stats = {k: float(_field(res, f"final.{k}", path, num)) for k in METRICS}
    stats.update({k: float(_field(res, k, path, num)) for k in ("time_s", "peak_memory_mb")})
    stats.update({k: float(_field(res, f"final.{k}", path, num)) for k in COUNTERFACT if k in res["final"]})
    stats.update({k: float(_field(res, k, path, num)) for k in ("residual", "cpu_time_s") if k in res})
    if isinstance(res.get("valid"), list):
        stats["valid_groups"] = float(len(res["valid"]))
    names = METRICS + tuple(k for k in COUNTERFACT if k in res["final"])
    pre = {k: float(_field(res, f"pre_edit.{k}", path, num)) for k in names} if "pre_edit" in res else None
    env = _field(res, "environment", path, dict) if res.get("environment") is not None else None
    m = _field(res, "config.data.n_edits", path, int)
    trained_m = _field(res, "trained.m", path, int) if res.get("trained") is not None else None
    return Run(path=path, result=str(result), model=model, data=data,
               editor=_field(res, "config.editor.name", path, str),
               variant=_field(res, "config.variant", path, str),
               m=m, seed=_field(res, "config.seed", path, int), stats=stats, pre_edit=pre, environment=env,
               config=res["config"], trained_m=None if trained_m == m else trained_m)


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every results.json under sweep_dir, sorted by path."""
    paths = sorted(sweep_dir.rglob("results.json"))
    if not paths:
        raise AggregateError(sweep_dir, None, "no results.json under this directory")
    return [read_run(p) for p in paths]


def summarize(runs: list[Run]) -> list[dict]:
    """One row per (result, model, data, editor, variant, m): n, seeds, mean and std of each stat."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    rows = []
    for key in sorted(groups, key=lambda k: (*k[:-1], k[-1] or 0)):  # trained_m: None or an int
        group = sorted(groups[key], key=lambda r: r.seed)
        for a, b in zip(group, group[1:]):
            if a.seed == b.seed:  # a re-run in the same tree would be counted twice
                raise AggregateError(b.path, "config.seed", f"seed {b.seed} of the same setting also in {a.path} (a "
                                     "training run and its evaluation from the checkpoint, say): pass one of the two")
        row = dict(zip(("result", "model", "data", "editor", "variant", "m", "trained_m"), key))
        row.update(n=len(group), seeds=" ".join(str(r.seed) for r in group))
        for stat in STATS:
            have = [r for r in group if stat in r.stats]
            if have and len(have) < len(group):
                lacking = next(r for r in group if stat not in r.stats)
                raise AggregateError(lacking.path, stat, f"missing, but present in {have[0].path}")
            values = np.array([r.stats[stat] for r in have])
            row[f"{stat}_mean"] = float(values.mean()) if have else None
            row[f"{stat}_std"] = float(values.std()) if have else None
        for stat in METRICS + COUNTERFACT:  # before editing (None for results.json files without pre_edit)
            pre = [r.pre_edit[stat] for r in group if r.pre_edit is not None and stat in r.pre_edit]
            row[f"pre_{stat}_mean"] = float(np.mean(pre)) if len(pre) == len(group) else None
        rows.append(row)
    return rows


def _rounded(value, digits: int = 4):
    """CSV cells for reading: floats to `digits` significant decimals; non-finite as 'nan'/'inf'."""
    if isinstance(value, float) and math.isfinite(value):
        return round(value, digits)
    return value


def write_csv(rows: list[dict], path: Path) -> None:
    """summary.csv, rounded for reading; absent stats (the residual of editors without one) are empty cells."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _rounded(v) for k, v in row.items()} for row in rows)


def label(row: dict, with_setting: bool = False) -> str:
    """Legend label: the editor (or the ablation variant of MALMEN), with model/data if needed, and the m its
    hyper-network was trained at when it edited another m."""
    name = EDITORS.get(row["editor"], row["editor"])
    if row["variant"] != "none":
        name = VARIANTS.get(row["variant"], row["variant"]) if row["editor"] == "malmen" else f"{name} ({row['variant']})"
    if row.get("trained_m") is not None:
        name += f" (trained at m = {row['trained_m']})"
    return f"{name} [{row['model']}/{row['data']}]" if with_setting else name


def _lines(rows: list[dict], stat: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """label -> (m, mean, std) sorted by m, for the rows that have `stat`."""
    several = len({(r["model"], r["data"]) for r in rows}) > 1
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r[f"{stat}_mean"] is not None:
            lines.setdefault(label(r, several), []).append(r)
    out = {}
    for name, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["m"])
        out[name] = tuple(np.array([r[k] for r in rs], dtype=float)
                          for k in ("m", f"{stat}_mean", f"{stat}_std"))
    return out


UNITS = {"ES": "edit success", "GS": "generalisation success", "LS": "locality success"}


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


def _title(rows: list[dict], title: str) -> str:
    """The figure title with the number of seeds behind each point."""
    n = sorted({r["n"] for r in rows})
    return f"{title} (mean ± std over {'/'.join(map(str, n))} seed{'s' if n != [1] else ''})"


def _legend_outside(fig, axes) -> None:
    """One legend for the figure, below the axes, so that it covers no data (LS sits near 1)."""
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))


def plot_scaling(rows: list[dict], title: str, path: Path) -> None:
    """ES, GS, LS (and CounterFact's scores, where the runs have them) against m (log2), one line per
    editor/variant, mean +- std shaded; before editing dashed."""
    stats = METRICS + tuple(s for s in COUNTERFACT if any(r[f"{s}_mean"] is not None for r in rows))
    fig, axes = plt.subplots(len(stats) // 3, 3, figsize=(13, 4.2 * (len(stats) // 3)), sharex=True, squeeze=False)
    axes = axes.ravel()
    for ax, stat in zip(axes, stats):
        for name, (m, mean, std) in _lines(rows, stat).items():
            ax.plot(m, mean, marker="o", ms=3, label=name)
            ax.fill_between(m, mean - std, mean + std, alpha=0.2)
        pre = sorted({(r["m"], r[f"pre_{stat}_mean"]) for r in rows if r[f"pre_{stat}_mean"] is not None})
        if pre:  # the edited model's own level, the reference every editor starts from
            by_m: dict[int, list[float]] = {}
            for m, v in pre:
                by_m.setdefault(m, []).append(v)
            ms = sorted(by_m)
            ax.plot(ms, [np.mean(by_m[m]) for m in ms], "k--", lw=1, label="before editing")
        _axis(ax, stat)
        ax.set_title(stat)
        ax.set_ylim(0, 1.02)
    fig.suptitle(_title(rows, title))
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
    fig.suptitle(_title(rows, title), fontsize=10)
    _legend_outside(fig, [ax])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def single_m_table(rows: list[dict], title: str) -> str:
    """Markdown for a result with one m, where a curve would be one dot: rows x (before, ES, GS, LS)."""
    rows = sorted(rows, key=lambda r: row_order(r["editor"], r["variant"]))
    several = len({(r["model"], r["data"]) for r in rows}) > 1
    stats = METRICS + (("residual",) if any(r["residual_mean"] is not None for r in rows) else ())
    lines = [f"**{_title(rows, title)}**, m = {rows[0]['m']}", "", "| | seeds | " + " | ".join(stats) + " |",
             "|---|---|" + "---|" * len(stats)]
    pre = [r for r in rows if r["pre_ES_mean"] is not None]
    if pre:
        lines.append("| before editing | | " + " | ".join(f"{np.mean([r[f'pre_{s}_mean'] for r in pre]):.3f}"
                                                      for s in METRICS) + " |" + " |" * (len(stats) - 3))
    for r in rows:
        lines.append(f"| {label(r, several)} | {r['n']} | " + " | ".join(
            "–" if r[f"{s}_mean"] is None else mean_std(r[f"{s}_mean"], r[f"{s}_std"], 3) for s in stats) + " |")
    return "\n".join(lines) + "\n"


def mean_std(mean: float, std: float | None, digits: int, scale: float = 1.0, why: str = "non-finite") -> str:
    """'mean (std)' (std None: the mean alone); 'n/a (why)' when either is NaN or infinite."""
    if not all(math.isfinite(v) for v in (mean, std) if v is not None):
        return f"n/a ({why})"
    return f"{scale * mean:.{digits}f}" + ("" if std is None else f" ({scale * std:.{digits}f})")


def row_order(editor: str, variant: str) -> tuple:
    """Table 1's row order: other editors first, then MALMEN's ablations, MALMEN itself last."""
    return editor == "malmen", list(VARIANTS).index(variant) if variant in VARIANTS else -1, editor, variant


def _cell(row: dict | None, stat: str) -> str:
    if row is None:
        return "–"
    return mean_std(row[f"{stat}_mean"], row[f"{stat}_std"], 1, scale=100)


def ablation_table(rows: list[dict], title: str, with_time: bool) -> str:
    """Markdown in the layout of Table 1 (with_time=False) or Table 2: variants x (setting, ES/GS/LS[, time])."""
    settings = sorted({(r["data"], r["model"], r["m"]) for r in rows})
    variants = sorted({(r["editor"], r["variant"]) for r in rows}, key=lambda ev: row_order(*ev))
    by_key = {(r["editor"], r["variant"], r["data"], r["model"], r["m"]): r for r in rows}
    stats = METRICS + (("time_s",) if with_time else ())
    head, rule = ["Variant"], ["---"]
    for data, model, m in settings:
        for stat in stats:
            name = "Time (h) ↓" if stat == "time_s" else f"{stat} (%) ↑"
            head.append(f"{data}, m = {m}: {model} {name}" if stat == "ES" else name)
            rule.append("---:")
    lines = [f"**{title}** (mean (std) over seeds)", "", "| " + " | ".join(head) + " |",
             "| " + " | ".join(rule) + " |"]
    before = ["Before editing"]  # the unedited model's level, per setting (time: –)
    for data, model, m in settings:
        pre = [r for r in rows if (r["data"], r["model"], r["m"]) == (data, model, m) and r["pre_ES_mean"] is not None]
        for stat in stats:
            before.append("–" if stat == "time_s" or not pre else f"{100 * np.mean([r[f'pre_{stat}_mean'] for r in pre]):.1f}")
    lines.append("| " + " | ".join(before) + " |")
    counts = set()
    for editor, variant in variants:
        cells = [label({"editor": editor, "variant": variant})]
        for data, model, m in settings:
            row = by_key.get((editor, variant, data, model, m))
            counts.add(row["n"] if row else None)
            for stat in stats:
                if stat == "time_s":
                    cells.append("–" if row is None else f"{row['time_s_mean'] / 3600:.3g}")
                else:
                    cells.append(_cell(row, stat))
        lines.append("| " + " | ".join(cells) + " |")
    n = sorted(c for c in counts if c is not None)
    lines += ["", f"Seeds per cell: {', '.join(map(str, sorted(set(n))))}. – : no run finished."]
    return "\n".join(lines) + "\n"


TITLES = {"fig4_bert_fever": "Fig. 4: BERT-base on FEVER", "fig5_gpt2_zsre": "Fig. 5: GPT-2 on zsRE",
          "fig6_t5xl_zsre": "Fig. 6: T5-XL on zsRE", "fig7_gptj_zsre": "Fig. 7: GPT-J on zsRE",
          "fig8_residual": "Fig. 8: cancellation effect", "table1": "Table 1: ablation study",
          "table2": "Table 2: ablation study on GPT-J",
          "toy_table": "Default experiment: toy GPT-2 on the synthetic world",
          "real_lm_zsre": "A real pretrained LM on zsRE ({setting})"}  # {setting}: model / data of the runs


def massive_table(rows: list[dict], title: str) -> str:
    """Markdown for the massive-editing experiment: a row per (m, editor), "before editing" first, with ES/GS/LS,
    CounterFact's three scores (mean (std) over seeds; one seed: the mean), validation groups, wall and CPU time
    per run."""
    stats = METRICS + COUNTERFACT
    head = ["m", "editor", *stats, "groups x seeds", "wall s", "CPU s"]
    lines = [f"**{_title(rows, title)}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in sorted({r["m"] for r in rows}):
        at_m = sorted((r for r in rows if r["m"] == m), key=lambda r: row_order(r["editor"], r["variant"]))
        pre = [np.mean([r[f"pre_{s}_mean"] for r in at_m if r[f"pre_{s}_mean"] is not None] or [np.nan]) for s in stats]
        lines.append(f"| {m} | before editing | " + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in pre)
                     + " | | | |")
        for r in at_m:
            cells = ["-" if r[f"{s}_mean"] is None else  # the spread over seeds, when there are several
                     mean_std(r[f"{s}_mean"], r[f"{s}_std"] if r["n"] > 1 else None, 3) for s in stats]
            groups = "-" if r["valid_groups_mean"] is None else f"{r['valid_groups_mean']:.0f} x {r['n']}"
            cpu = "-" if r["cpu_time_s_mean"] is None else f"{r['cpu_time_s_mean']:.0f}"
            lines.append(f"| {m} | {label(r)} | " + " | ".join(cells) + f" | {groups} | {r['time_s_mean']:.0f} | {cpu} |")
    return "\n".join(lines) + "\n"


def aggregate(sweep_dir: Path, out_dir: Path) -> list[Path]:
    """Read every run under sweep_dir and write the CSV, plots and tables to out_dir; returns the files."""
    rows = summarize(find_runs(sweep_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.csv"]
    write_csv(rows, written[0])
    for result in sorted({r["result"] for r in rows}):
        part = [r for r in rows if r["result"] == result]
        setting = ", ".join(sorted({f"{r['model']} / {r['data']}" for r in part}))
        title = TITLES.get(result, "{result}: {setting}").format(result=result, setting=setting)
        if result in TABLES:
            written.append(out_dir / f"{result}.md")
            written[-1].write_text(massive_table(part, title) if result == "massive_counterfact" else
                                   ablation_table(part, title, with_time=result == "table2"))
            if result not in PLOTTED_TABLES or len({r["m"] for r in part}) == 1:
                continue
        has_residual = any(r["residual_mean"] is not None for r in part)
        if len({r["m"] for r in part}) == 1 and result != "fig8_residual":  # one dot per line: a table
            written.append(out_dir / f"{result}.md")
            written[-1].write_text(single_m_table(part, title))
            continue
        if result != "fig8_residual":
            written.append(out_dir / f"{result}.png")
            plot_scaling(part, title, written[-1])
        if has_residual:
            written.append(out_dir / ("fig8_residual.png" if result == "fig8_residual" else f"{result}_residual.png"))
            plot_residual(part, title, written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="directory searched recursively for results.json")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: sweep_dir)")
    args = parser.parse_args(argv)
    try:
        written = aggregate(args.sweep_dir, args.out or args.sweep_dir)
    except AggregateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

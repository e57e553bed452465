"""The README's result tables as data: results.json trees -> results/<name>/ -> the README's marked blocks.

usage: python scripts/readme_tables.py table DIR [DIR ...] [--by KEY ...] [--spread seeds|groups] [--times]
                                             [--made-by CMD] [--save NAME [--readme README.md]]
       python scripts/readme_tables.py readme [NAME ...] [--readme README.md] [--check]
       python scripts/readme_tables.py check DIR [DIR ...] --name NAME [--tol 0.03 | --tol-std K]

`table` reads every results.json under the DIRs (scripts/runs.py) and prints one Markdown table per model and
data set: per m, a "before editing" row (runs.levels_before), then a row per editor and ablation variant (and
per value of each `--by` config key), each score as mean (std) from runs.summarize, whose spread is over seeds or
(`--spread groups`) over every validation group of every seed. `--save NAME` writes the table as data to
results/NAME/: summary.csv (a row per table row: m, row, count, each score's mean and std, wall and CPU seconds,
and the row's own command) and about.yaml (the setting, the spread, the one command that makes the table, and
one provenance line: commit range, dates, machine, load). The commands run on any machine: a path inside the
repository is written relative to its root, one outside it under DIR (the deepest folder holding the runs and
what their overrides name; `--made-by CMD` names the command that writes DIR), cache_dir as CACHE.
`--readme F` (with --save) then renders that block of F.

`readme` renders results/NAME/ (by default every NAME whose markers the file has: README.md, or a docs page) between `<!-- table:NAME -->` and `<!-- /table:NAME -->`
in the README: the table, its one command, its provenance line and a link to the data. The README shows only
what results/ holds; `--check` changes nothing and exits 1 if a block differs from its data.

`check` compares a rerun's means with results/NAME/summary.csv, row by row (the rows both have, at the rerun's
m): within ±tol, or `--tol-std K` times each row's std (plus 0.0005 for the rounding to 3 decimals). Exit
status 0: all within; 1: one differs (or is not finite); 2: bad input.
"""
import argparse
import csv
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.report import markdown_table  # noqa: E402
from scripts.provenance import command, one_command, out_dir, provenance  # noqa: E402
from scripts.runs import (COUNTERFACT, GENERATED, METRICS, AggregateError, Run, find_runs, label, mean_std,  # noqa: E402
                          row_order, summarize, write_csv)
from util import atomic_write  # noqa: E402

BEFORE = "before editing"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"  # the tables' data (--results)


def _get(config: dict, dotted: str):
    """config[a][b]... for 'a.b' (None where absent)."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def read_runs(dirs: list[Path], by: list[str]) -> list[Run]:
    """Every run under dirs (each once), its `result` replaced by the values of the `by` keys, so that a run of
    `python main.py` and the same setting in a sweep fall in one row."""
    paths = {}
    for d in dirs:
        for run in find_runs(d):
            paths.setdefault(run.path.resolve(), run)
    return [replace(run, result=", ".join(f"{k}={_get(run.config, k)}" for k in by)) for run in paths.values()]


# ----- runs -> table rows ------------------------------------------------------------------------------------
def columns(runs: list[Run]) -> tuple[str, ...]:
    """ES, GS, LS; CounterFact's three scores and the generated scores when every run has them."""
    have = lambda names: all(k in r.stats for r in runs for k in names)  # noqa: E731
    return METRICS + (COUNTERFACT if have(COUNTERFACT) else ()) + (GENERATED if have(GENERATED) else ())


def _sortable(value) -> tuple:
    """Numbers before strings, numbers by value (n_epochs 80 before 100)."""
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def build_rows(runs: list[Run], by: list[str], spread: str = "seeds") -> tuple[list[dict], dict]:
    """The table's rows, per m "before editing" first, from runs.summarize, and what the table is: {setting,
    spread, columns}. A row: m, row, count (seeds, or groups x seeds), seeds, {col: (mean, std or None, why)},
    wall and CPU seconds, command."""
    if len({(r.model, r.data) for r in runs}) > 1:
        raise ValueError("one table is one model and data set: these runs have several (pass their folders apart)")
    names = columns(runs)
    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        by_key.setdefault(r.key, []).append(r)
    with np.errstate(invalid="ignore"):  # inf - inf in a std: shown as n/a
        summary = summarize(runs, spread)
    where = out_dir(runs)
    rows = []
    for m in sorted({r["m"] for r in summary}):
        at_m = sorted((s for s in summary if s["m"] == m), key=lambda s: (
            row_order(s["editor"], s["variant"]), s["trained_m"] or 0,
            tuple(_sortable(_get(by_key[_key(s)][0].config, b)) for b in by)))
        mine = [r for s in at_m for r in by_key[_key(s)]]
        missing = next((r for r in mine if r.pre_edit is None or any(k not in r.pre_edit for k in names)), None)
        if missing:
            raise AggregateError(missing.path, "pre_edit", "missing")
        seeds = sorted({r.seed for r in mine})
        groups = lambda s: sum(r.n_groups for r in by_key[_key(s)])  # noqa: E731
        count = lambda s, n: str(n) if spread == "seeds" else (  # noqa: E731
            f"{groups(s) // n} x {n}" if groups(s) % n == 0 else str(groups(s)))
        first = at_m[0]
        rows.append({"m": m, "row": BEFORE, "count": count(first, len(by_key[_key(first)])) if spread == "groups"
                     else str(len(seeds)), "seeds": " ".join(map(str, seeds)),
                     "cells": {k: (first[f"pre_{k}_mean"], first[f"pre_{k}_std"] if len(seeds) > 1 else None, "")
                               for k in names}, "wall_s": None, "cpu_s": None, "command": ""})
        for s in at_m:
            rs = by_key[_key(s)]
            several = s["n"] > 1 if spread == "seeds" else groups(s) > 1
            rows.append({"m": m, "row": label(s) + (f", {s['result']}" if by else ""), "count": count(s, s["n"]),
                         "seeds": s["seeds"],
                         "cells": {k: (s[f"{k}_mean"], s[f"{k}_std"] if several else None,
                                       f"non-finite in {sum(not math.isfinite(r.stats[k]) for r in rs)} of {len(rs)} runs")
                                   for k in names},
                         "wall_s": s["time_s_mean"], "cpu_s": s["cpu_time_s_mean"], "command": command(rs, where)})
    return rows, {"setting": f"{runs[0].model}, {runs[0].data}", "spread": spread, "columns": list(names)}


def _key(s: dict) -> tuple:
    return tuple(s[k] for k in ("result", "model", "data", "editor", "variant", "m", "trained_m"))


def render(rows: list[dict], about: dict, times: bool, link: str | None = None) -> str:
    """The table in Markdown (an m column, a row per table row) with its command and provenance lines."""
    head = ["m", "editor", "groups x seeds" if about["spread"] == "groups" else "seeds", *about["columns"]]
    head += ["wall s", "CPU s"] if times else []
    secs = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
    body = [[r["m"], r["row"], r["count"], *(mean_std(*r["cells"][k][:2], 3, why=r["cells"][k][2] or "non-finite")
                                             for k in about["columns"]),
             *([secs(r["wall_s"]), secs(r["cpu_s"])] if times else [])] for r in rows]
    spread = "over seeds" if about["spread"] == "seeds" else "over the validation groups of every seed"
    lines = [f"{about['setting']}, mean (std {spread}; before editing: over seeds):", "", *markdown_table(head, body),
             "", "Command: " + (f"first `{about['prepare']}`, then " if about.get("prepare") else "")
             + f"`{about['command']}`" + (f", per row: {about['per_row']} (summary.csv: command)"
                                                    if about.get("per_row") else "")
             + (f" ({about['placeholders']})" if about.get("placeholders") else "") + ".", f"Provenance: {about['provenance']}." + (f" Data and each row's command: [{link}]({link})." if link
                                                            else "")]
    return "\n".join(lines) + "\n"


# ----- results/<name>/ ---------------------------------------------------------------------------------------
def save(name: str, rows: list[dict], about: dict) -> Path:
    """results/NAME/summary.csv and about.yaml."""
    folder = RESULTS / name
    folder.mkdir(parents=True, exist_ok=True)
    write_csv([{"m": r["m"], "row": r["row"], "count": r["count"], "seeds": r["seeds"],
                **{f"{k}{s}": r["cells"][k][i] for k in about["columns"] for i, s in ((0, ""), (1, "_std"))},
                "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "command": r["command"]} for r in rows],
              folder / "summary.csv", digits=6)
    atomic_write(folder / "about.yaml", yaml.safe_dump(about, sort_keys=False, allow_unicode=True, width=1000))
    return folder


def load(name: str) -> tuple[list[dict], dict]:
    """results/NAME as (rows, about); ValueError naming the file and the field of a bad one."""
    folder = RESULTS / name
    about = yaml.safe_load((folder / "about.yaml").read_text())
    rows = []
    for i, rec in enumerate(csv.DictReader(open(folder / "summary.csv"))):
        value = lambda k: None if rec.get(k, "") == "" else float(rec[k])  # noqa: E731
        try:
            rows.append({"m": int(rec["m"]), "row": rec["row"], "count": rec["count"], "seeds": rec["seeds"],
                         "cells": {k: (value(k), value(f"{k}_std"), "") for k in about["columns"]},
                         "wall_s": value("wall_s"), "cpu_s": value("cpu_s"), "command": rec["command"]})
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{folder / 'summary.csv'}: row {i + 1}: {err!r}") from err
    return rows, about


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- table:{name} -->", f"<!-- /table:{name} -->"


def readme_block(readme: Path, name: str, body: str | None = None) -> str:
    """The text between the markers of NAME in readme; with `body`, replace it (atomically, keeping the mode)."""
    text = readme.read_text()
    for marker in _markers(name):
        if text.count(marker) != 1:
            raise ValueError(f"{readme}: marker '{marker}' " + ("not found" if marker not in text else "appears twice"))
    i, j = text.index(_markers(name)[0]) + len(_markers(name)[0]), text.index(_markers(name)[1])
    if j < i:
        raise ValueError(f"{readme}: marker '{_markers(name)[1]}' comes before '{_markers(name)[0]}'")
    if body is not None:
        mode = readme.stat().st_mode
        atomic_write(readme, text[:i] + "\n" + body.strip("\n") + "\n" + text[j:])
        os.chmod(readme, mode)
    return text[i:j]


def view(name: str, page: Path) -> str:
    """What a page (the README, a docs page) shows of results/NAME, linking to it."""
    rows, about = load(name)
    return render(rows, about, about.get("times", False),
                  Path(os.path.relpath(RESULTS / name, page.resolve().parent)).as_posix() + "/")


# ----- a rerun against the data ------------------------------------------------------------------------------
def check(rows: list[dict], expected: list[dict], tol: float, source: str, k: float | None = None) -> int:
    """Print the data's and the rerun's means and their differences; 0 if all within the tolerance, else 1."""
    ms = {r["m"] for r in rows}
    want = {r["row"]: r["cells"] for r in expected if r["m"] in ms}
    got = {r["row"]: r["cells"] for r in rows}
    common = [n for n in want if n in got]
    if not [n for n in common if n != BEFORE]:
        raise ValueError(f"{source}: no row of the runs ({', '.join(got)}) is in the data ({', '.join(want)}) at m = "
                         f"{', '.join(map(str, sorted(ms)))}")
    if k is not None:
        missing = [f"{n} {c}" for n in common for c in METRICS if want[n][c][1] is None]
        if missing:
            raise ValueError(f"{source}: no std for {', '.join(missing)}: the tolerance is k std")
    w = max(map(len, common))
    print(f"{source}, tolerance {f'±{k:g} std' if k is not None else f'±{tol:.3f}'}\n{'':{w + 12}}"
          + "".join(f"{c:>9}" for c in METRICS))
    differ = []
    for n in common:
        diff = [got[n][c][0] - want[n][c][0] for c in METRICS]
        allowed = [k * want[n][c][1] + 0.0005 if k is not None else tol for c in METRICS]
        for what, values, fmt in (("data", [want[n][c][0] for c in METRICS], "9.3f"),
                                  ("run", [got[n][c][0] for c in METRICS], "9.3f"), ("difference", diff, "+9.3f"),
                                  ("tolerance", allowed, "9.4f")):
            print(f"{n:{w}}  {what:10}" + "".join(f"{v:{fmt}}" if math.isfinite(v) else f"{'n/a':>9}" for v in values))
        differ += [f"{n} {c}" for c, d, a in zip(METRICS, diff, allowed) if not abs(d) <= a + 1e-9]  # NaN differs
    for n in want.keys() - got.keys():
        print(f"not measured by these runs: {n}")
    print(f"differ beyond the tolerance: {', '.join(differ)}" if differ else "all within the tolerance")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="print the table of the runs under DIR; --save NAME: write it to results/NAME")
    r = sub.add_parser("readme", help="render results/NAME into the README's block NAME (all by default)")
    c = sub.add_parser("check", help="compare the runs under DIR with results/NAME; exit 1 beyond the tolerance")
    for p in (t, c):
        p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="searched recursively for results.json")
        p.add_argument("--by", action="append", default=[], metavar="KEY",
                       help="also split rows by this config key (dotted, e.g. n_epochs or editor.rank)")
    t.add_argument("--spread", choices=("seeds", "groups"), default="seeds",
                   help="the std in parentheses: over seeds (default), or over every validation group of every seed")
    t.add_argument("--times", action="store_true", help="add each row's wall and CPU seconds per run")
    t.add_argument("--made-by", metavar="CMD", help="the command that writes DIR, e.g. 'OUT=DIR scripts/real_lm.sh'")
    t.add_argument("--prepare", metavar="CMD", help="the command that makes what the rows load (a meta-trained "
                                                    "network), shown before the table's command")
    t.add_argument("--save", metavar="NAME", help="write the table to results/NAME (summary.csv, about.yaml)")
    r.add_argument("names", nargs="*", metavar="NAME", help="default: every results/NAME whose block the file has")
    for p in (t, r):
        p.add_argument("--readme", type=Path, help="the README whose block NAME shows results/NAME")
    r.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from its data")
    for p in (t, r, c):
        p.add_argument("--results", type=Path, metavar="DIR",
                       help="the folder of the tables' data (default: the repository's results/)")
    c.add_argument("--name", required=True, help="results/NAME to compare with")
    c.add_argument("--tol", type=float, default=0.03, help="largest allowed |run - data| (default 0.03)")
    c.add_argument("--tol-std", type=float, metavar="K", help="instead: allow K times each row's std")
    args = parser.parse_args(argv)
    if args.results is not None:
        globals()["RESULTS"] = args.results
    if args.cmd == "table" and args.readme and not args.save:
        parser.error("--readme renders the saved data: give --save NAME")
    try:
        if args.cmd == "readme":
            readme = args.readme or ROOT / "README.md"
            names = args.names or sorted(p.name for p in RESULTS.iterdir() if (p / "about.yaml").is_file()
                                         and all(m in readme.read_text() for m in _markers(p.name)))  # its blocks
            stale = [n for n in names if readme_block(readme, n).strip("\n") != view(n, readme).strip("\n")]
            if args.check:
                print("\n".join(f"{readme}: block {n} differs from results/{n}/" for n in stale) or "every block "
                      "shows its data")
                return 1 if stale else 0
            for n in stale:
                readme_block(readme, n, view(n, readme))
                print(f"{readme}: block {n} rendered from results/{n}/", file=sys.stderr)
            return 0
        runs = read_runs(args.dirs, args.by)
        if args.cmd == "check":
            rows = build_rows(runs, args.by)[0]
            return check(rows, load(args.name)[0], args.tol, f"results/{args.name}", args.tol_std)
        rows, about = build_rows(runs, args.by, args.spread)
        commands = [r["command"] for r in rows if r["command"]]
        about["command"], about["per_row"] = (args.made_by, "") if args.made_by else one_command(commands)
        if args.prepare:
            about["prepare"] = args.prepare
        text = " ".join(commands + [about["command"], args.prepare or ""])
        about["placeholders"] = "; ".join(
            ([f"DIR: the folder that `{args.made_by}` writes" if args.made_by else
              "DIR: the folder holding the runs and the files their commands name"] if "=DIR" in text else [])
            + (["CACHE: a cache folder of their own"] if "=CACHE" in text else []))
        about["provenance"], about["times"] = provenance(runs), args.times
        print(render(rows, about, args.times), end="")
        if args.save:
            print(f"{save(args.save, rows, about)}: written", file=sys.stderr)
            if args.readme:
                readme_block(args.readme, args.save, view(args.save, args.readme))
    except (OSError, ValueError) as err:  # AggregateError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

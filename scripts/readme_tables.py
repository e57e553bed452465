"""The README's tables of results, from results.json files; and the check that a rerun matches one.

usage: python scripts/readme_tables.py table DIR [DIR ...] [--by KEY ...] [--csv PATH] [--readme README.md --name NAME]
                                             [--made-by CMD] [--times] [--combined] [--spread seeds|groups]
       python scripts/readme_tables.py check DIR [DIR ...] [--readme README.md] [--name default]
                                             [--tol 0.03 | --tol-std K]

`table` reads every results.json under the DIRs (run or sweep directories, searched recursively) and
prints one Markdown table per (model, data, m): a "before editing" row (the runs' pre_edit, one value per
seed, since the editors of one seed edit the same groups; runs of a seed that disagree are refused), then one
row per editor and ablation variant (and per value of each `--by` config key, e.g. `--by n_epochs`),
with ES, GS and LS as mean (std over seeds, numpy's ddof=0; the mean alone for one seed; `--spread groups`:
over every validation group of every seed, results.json "valid"). Under each
table goes one provenance line: the command of each row (rebuilt from the runs' .hydra/overrides.yaml),
the commit(s), the machine, the load and the dates (from results.json "environment"). The commands run
on any machine: a path inside the repository is written relative to its root, one outside it under DIR,
the deepest folder holding the runs and those paths (`--made-by CMD` names the command that writes it,
e.g. 'OUT=DIR scripts/real_lm.sh'); cache_dir is left out at the default cache, else CACHE. A NaN or
infinite value is printed as "n/a (why)", never as a number. `--csv` writes the same rows as CSV;
`--readme F --name NAME` replaces what lies between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in F.

`check` builds the same table from the DIRs and compares it, row by row (the rows both have), with the
first Markdown table between the markers NAME in the README. Each README cell's first number is its
value ("0.488 (0.015)" reads 0.488), columns are found by their header (ES, GS, LS), rows by their first
cell ("MALMEN", "before editing"). `--tol-std K` allows K times each README cell's std (the number in
parentheses) instead of a fixed ±tol. Exit status 0: every compared value within the tolerance; 1: one differs
(or is n/a); 2: bad input (no runs, a missing marker, column or row). The runs are read by scripts/runs.py,
the README's marked blocks by scripts/readme_blocks.py.
"""
import argparse
import math
import os
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.readme_blocks import read_block, replace_block  # noqa: E402
from scripts.runs import (COUNTERFACT, GENERATED, METRICS, AggregateError, Run, find_runs, label, mean_std,  # noqa: E402
                          row_order, summarize, write_csv)

BEFORE = "before editing"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["cache_dir"]  # relative to ROOT


# ----- runs -> tables ------------------------------------------------------------------------------
def _get(config: dict, dotted: str):
    """config[a][b]... for 'a.b' (None where absent)."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def read_runs(dirs: list[Path], by: list[str]) -> list[Run]:
    """Every run under dirs (each once), its `result` replaced by the values of the `by` keys.

    The paper_result is dropped from the grouping, so that a run of `python main.py` and the same
    setting in a sweep fall in one row."""
    paths = {}
    for d in dirs:
        for run in find_runs(d):
            paths.setdefault(run.path.resolve(), run)
    return [replace(run, result=", ".join(f"{k}={_get(run.config, k)}" for k in by))
            for run in paths.values()]


def _overrides(run: Run) -> list[str] | None:
    """The run's command-line overrides (Hydra's .hydra/overrides.yaml), None if not recorded."""
    path = run.path.parent / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else None


def _outside(override: str) -> Path | None:
    """The absolute path outside the repository that a key=value override names (cache_dir aside), else None."""
    key, _, value = override.partition("=")
    path = Path(value).resolve() if value.startswith("/") else None
    return None if path is None or path.is_relative_to(ROOT) or key.lstrip("+~") == "cache_dir" else path


def out_dir(runs: list[Run]) -> Path | None:
    """DIR: the deepest folder holding the runs and the paths outside the repository that their overrides
    name (real_lm.sh's OUT: DIR/split, DIR/results/...); None where they name none."""
    named = [p for r in runs for p in map(_outside, _overrides(r) or []) if p]
    if not named:
        return None
    out = Path(os.path.commonpath([*named, *(r.path.parent.resolve() for r in runs)]))
    if out == Path(out.anchor):  # DIR = / would print the machine's paths under another name
        raise AggregateError(runs[0].path, None, f"these runs and the files their commands name ({named[0]}, ...) share "
                             "no folder but the root, so their commands cannot be written without this machine's paths: "
                             "keep the runs and their files under one folder (real_lm.sh's OUT does)")
    return out


def portable(override: str, out: Path | None) -> str | None:
    """The override as any machine can run it: a path inside the repository relative to its root, one
    outside under DIR (`out`), cache_dir's as CACHE; None for cache_dir at the default cache."""
    key, _, value = override.partition("=")
    if not value.startswith("/"):
        return override
    path, cache = Path(value).resolve(), key.lstrip("+~") == "cache_dir"
    if path.is_relative_to(ROOT):
        value = path.relative_to(ROOT).as_posix()
        return None if cache and value == DEFAULT_CACHE else f"{key}={value}"
    return f"{key}={'CACHE' if cache else (Path('DIR') / path.relative_to(out)).as_posix()}"


def command(runs: list[Run], out: Path | None = None) -> str:
    """One `python main.py [-m] ...` that reruns these runs (values of a key merged: seed=0,1,2), its paths
    as `portable` writes them, under DIR = `out` (default: out_dir(runs))."""
    out = out or out_dir(runs)
    overrides = [_overrides(r) for r in runs]
    if any(o is None for o in overrides):
        return "command not recorded"
    overrides = [[p for p in (portable(o, out) for o in ovs) if p is not None] for ovs in overrides]
    keys = [[o.split("=", 1)[0] for o in ovs] for ovs in overrides]
    if any(k != keys[0] for k in keys):  # not one sweep: one command per distinct override list
        return "; ".join(dict.fromkeys(command([r], out) for r in runs))
    merged = [(k, list(dict.fromkeys(ovs[i].split("=", 1)[1] for ovs in overrides if "=" in ovs[i])))
              for i, k in enumerate(keys[0])]
    sweep = any(len(values) > 1 for _, values in merged)
    return " ".join(["python main.py", *(["-m"] if sweep else []),
                     *(shlex.quote(f"{k}={','.join(v)}" if v else k) for k, v in merged)])


def provenance(runs: list[Run]) -> str:
    """Commit(s), machine(s), load range and date range of the runs' recorded environment."""
    envs = [r.environment for r in runs if r.environment]
    if not envs:
        return "Environment not recorded."
    commits = sorted({(e.get("commit") or "unknown (not a git checkout)")
                      + (" (uncommitted changes)" if e.get("dirty") else "")
                      + (f" (checkout moved to {e['checkout_changed']['commit']}"
                         + (" with uncommitted changes" if e["checkout_changed"].get("dirty") else "") + " during the run)"
                         if e.get("checkout_changed") else "") for e in envs})
    machines = sorted({f"{e.get('cpu')}, {e.get('cpu_count')} cores, torch threads {e.get('threads')}, "
                       f"{'GPU ' + e['gpu'] if e.get('gpu') else 'no GPU'}; torch {e.get('torch')}, "
                       f"transformers {e.get('transformers')}" for e in envs})
    loads = [e["load_1min"] for e in envs if isinstance(e.get("load_1min"), (int, float))]
    dates = sorted(str(e.get("date"))[:10] for e in envs)
    parts = [f"Commit {', '.join(commits)}", f"machine: {' / '.join(machines)}",
             f"load (1 min, at the end) {min(loads):.2f}" + (f"–{max(loads):.2f}" if max(loads) > min(loads) else "")
             if loads else "load not recorded",
             f"date {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")]
    missing = len(runs) - len(envs)
    return "; ".join(parts) + (f"; environment not recorded for {missing} of {len(runs)} runs." if missing else ".")


def columns(runs: list[Run]) -> tuple[str, ...]:
    """ES, GS, LS; CounterFact's three scores and the generated scores when every run has them."""
    have = lambda names: all(k in r.stats for r in runs for k in names)  # noqa: E731
    return METRICS + (COUNTERFACT if have(COUNTERFACT) else ()) + (GENERATED if have(GENERATED) else ())


def _row(name: str, runs: list[Run], values: list[list[float]], seeds: str = "",
         pooled: list[list[float]] | None = None) -> dict:
    """A table row from per-run values of the table's columns: means (full precision) and printed cells. The std
    is over the runs (seeds), or over `pooled`, the columns' values in every validation group of every run."""
    arr = np.array(values, dtype=float)  # (n_runs, columns)
    spread = arr if pooled is None else np.array(pooled, dtype=float)  # (n_runs or n_groups, columns)
    with np.errstate(invalid="ignore"):  # inf - inf: shown as n/a below
        means, stds = arr.mean(axis=0).tolist(), spread.std(axis=0).tolist()
    cells = [mean_std(means[j], stds[j] if len(spread) > 1 else None, 3,
                      why=f"non-finite in {int((~np.isfinite(arr[:, j])).sum())} of {len(arr)} runs")
             for j in range(arr.shape[1])]
    per_run = [r.n_groups for r in runs]
    count = str(len(runs)) if pooled is None else f"{per_run[0]} x {len(runs)}" if len(set(per_run)) == 1 \
        else "+".join(map(str, per_run))  # groups x seeds
    return {"name": name, "n": len(runs), "count": count, "seeds": seeds, "means": means, "cells": cells,
            "runs": runs}


def _pooled(runs: list[Run], names: tuple[str, ...]) -> list[list[float]]:
    """The columns' values in every validation group of every run; AggregateError naming a run without them."""
    for r in runs:
        if not r.groups or any(k not in r.groups for k in names):
            raise AggregateError(r.path, "valid", "no per-group values (the spread over groups needs them)")
    return [[r.groups[k][i] for k in names] for r in runs for i in range(r.n_groups)]


def _sortable(value) -> tuple:
    """Numbers before strings, numbers by value (n_epochs 80 before 100)."""
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _level_before(runs: list[Run], seed: int, names: tuple[str, ...], tol: float = 1e-6) -> list[float]:
    """The `names` metrics before editing of the runs of `seed`, which must agree (the same validation groups);
    AggregateError naming two runs that do not."""
    mine = [r for r in runs if r.seed == seed]
    for r in mine[1:]:
        for k in names:
            if not abs(r.pre_edit[k] - mine[0].pre_edit[k]) <= tol:
                raise AggregateError(r.path, "pre_edit", f"{k} {r.pre_edit[k]:.6g} before editing, but "
                                     f"{mine[0].pre_edit[k]:.6g} in {mine[0].path} (seed {seed}, same m): the runs "
                                     "edited other validation groups (another max_valid_steps or validation file) "
                                     "or measured them otherwise; put them in separate tables")
    return [mine[0].pre_edit[k] for k in names]


def build_tables(runs: list[Run], by: list[str], spread: str = "seeds") -> list[dict]:
    """One table per (model, data, m): {title, rows, runs}; the first row is before editing. `spread`: the std
    over seeds, or over the validation groups of every seed ("groups"; the before-editing row: over seeds)."""
    with np.errstate(invalid="ignore"):  # an infinite value: n/a in the table
        summarize(runs)  # aggregate's checks: one run per seed and setting, the same stats in every run
    settings: dict[tuple, dict[tuple, list[Run]]] = {}  # (model, data, m) -> row key -> runs
    for run in sorted(runs, key=lambda r: r.seed):
        row_key = (row_order(run.editor, run.variant), run.trained_m or 0,
                   tuple(_sortable(_get(run.config, b)) for b in by))
        settings.setdefault((run.model, run.data, run.m), {}).setdefault(row_key, []).append(run)
    tables = []
    for (model, data, m), groups in sorted(settings.items()):
        names = columns([r for rs in groups.values() for r in rs])
        rows = [_row(label({"editor": rs[0].editor, "variant": rs[0].variant, "trained_m": rs[0].trained_m})
                     + (f", {rs[0].result}" * bool(by)),
                     rs, [[r.stats[k] for k in names] for r in rs], " ".join(str(r.seed) for r in rs),
                     _pooled(rs, names) if spread == "groups" else None)
                for _, rs in sorted(groups.items())]
        every = [r for row in rows for r in row["runs"]]
        lacking = next((r for r in every if r.pre_edit is None), None)
        if lacking:
            raise AggregateError(lacking.path, "pre_edit", "missing")
        seeds = sorted({r.seed for r in every})  # the editors of one seed edit the same groups: one value per seed
        before = {**_row(BEFORE, every, [_level_before(every, s, names) for s in seeds], " ".join(map(str, seeds))),
                  "n": len(seeds), "count": str(len(seeds)) if spread == "seeds" else rows[0]["count"]}  # same groups
        tables.append({"title": f"m = {m} ({model}, {data})", "rows": [before, *rows], "runs": every,
                       "columns": names, "m": m, "setting": f"{model}, {data}", "spread": spread})
    return tables


def placeholders(commands: str, runs: list[Run], out: Path | None, made_by: str | None) -> str:
    """What DIR (`out`) and CACHE stand for, where the commands use them."""
    notes = ""
    if re.search(r"=DIR\b", commands):
        held = Path("DIR", Path(os.path.commonpath([r.path.parent.resolve() for r in runs])).relative_to(out))
        notes += (f"DIR: the folder that `{made_by}` writes. " if made_by else
                  f"DIR: the folder that holds these runs ({held.as_posix()}) and the files their commands name. ")
    if "=CACHE" in commands:
        notes += "CACHE: a cache folder of their own, not the default `cache`. "
    return notes


def _seconds(runs: list[Run], stat: str) -> str:
    """Mean seconds per run of `stat` (time_s, cpu_time_s), '-' when a run lacks it."""
    values = [r.stats.get(stat) for r in runs]
    return "-" if None in values else f"{np.mean(values):.0f}"


def _spent(row: dict, first: bool, times: bool) -> list[str]:
    """The row's wall and CPU seconds per run (`times`; blank on the "before editing" row)."""
    if not times:
        return []
    return [" ", " "] if first else [_seconds(row["runs"], "time_s"), _seconds(row["runs"], "cpu_time_s")]


def markdown(tables: list[dict], made_by: str | None = None, times: bool = False, combined: bool = False) -> str:
    """The tables in Markdown, each followed by its provenance line (DIR: the folder `made_by` writes);
    `times`: wall and CPU seconds per run as two more columns; `combined`: one table with an m column for
    all of them (one model and data; the provenance of every run under it)."""
    extra = ["wall s", "CPU s"] if times else []
    if combined:
        if len({(t["setting"], t["columns"]) for t in tables}) > 1:
            raise ValueError("--combined puts one model and data set in one table: these runs have several")
        groups = tables[0]["spread"] == "groups"
        head = ["m", "editor", "groups x seeds" if groups else "seeds", *tables[0]["columns"], *extra]
        lines = [f"{tables[0]['setting']}" + (", mean (std over the validation groups of every seed; before editing: "
                                              "over seeds)" if groups else "") + ":",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [f"| {t['m']} | {r['name']} | {r['count']} | " + " | ".join(r["cells"] + _spent(r, i == 0, times))
                  + " |" for t in tables for i, r in enumerate(t["rows"])]
        every = [r for t in tables for r in t["runs"]]
        where = out_dir(every)
        commands = "; ".join(f"m = {t['m']}, {r['name']}: `{command(r['runs'], where)}`"
                             for t in tables for r in t["rows"][1:])
        return "\n".join(lines + ["", f"Commands: {commands}. {placeholders(commands, every, where, made_by)}"
                                      f"{provenance(every)}"]) + "\n"
    out = []
    for t in tables:
        head = ["groups x seeds" if t["spread"] == "groups" else "seeds", *t["columns"], *extra]
        lines = [f"| {t['title']} | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        lines += [f"| {r['name']} | {r['count']} | " + " | ".join(r["cells"] + _spent(r, i == 0, times)) + " |"
                  for i, r in enumerate(t["rows"])]
        where = out_dir(t["runs"])
        commands = "; ".join(f"{r['name']}: `{command(r['runs'], where)}`" for r in t["rows"][1:])
        out.append("\n".join(lines + ["", f"Commands: {commands}. {placeholders(commands, t['runs'], where, made_by)}"
                                           f"{provenance(t['runs'])}"]))
    return "\n\n".join(out) + "\n"


def csv_rows(tables: list[dict]) -> list[dict]:
    """The tables' rows for write_csv; non-finite cells stay 'n/a (why)'."""
    return [{"table": t["title"], "row": r["name"], "n": r["n"], "seeds": r["seeds"], **dict(zip(t["columns"], r["cells"])),
             "command": command(r["runs"], out_dir(t["runs"])) if r["name"] != BEFORE else ""}
            for t in tables for r in t["rows"]]


# ----- a rerun against a README table (read by scripts/readme_blocks.read_block) -------------------------------
def check(tables: list[dict], expected: dict[str, dict[str, float]], tol: float, source: str,
          spread: dict[str, dict[str, float]] | None = None, k: float | None = None) -> int:
    """Print README and measured rows and their differences; 0 if all within the tolerance, else 1. The tolerance
    is ±tol, or with `spread` (the README cells' std in parentheses) ±(k std + 0.0005) of each cell: the measured
    spread, and the README's rounding to 3 decimals."""
    if len(tables) != 1:
        raise ValueError(f"the runs make {len(tables)} tables ({', '.join(t['title'] for t in tables)}); check one")
    at = [tables[0]["columns"].index(k) for k in METRICS]  # the README table's columns, of the runs' wider ones
    measured = {r["name"]: [r["means"][j] for j in at] for r in tables[0]["rows"]}
    common = [name for name in expected if name in measured]
    if not [n for n in common if n != BEFORE]:
        raise ValueError(f"{source}: no row of the runs' table ({', '.join(measured)}) is in the README table "
                         f"({', '.join(expected)})")
    w = max(map(len, common))
    if spread is not None:
        missing = [f"{n} {m}" for n in common for m in METRICS if not math.isfinite(spread[n][m])]
        if missing:
            raise ValueError(f"{source}: no spread in parentheses for {', '.join(missing)}: the tolerance is k std")
    rule = f"±{k:g} std of the README's seeds" if spread is not None else f"±{tol:.3f}"
    print(f"{source}, tolerance {rule}\n{'':{w + 12}}" + "".join(f"{m:>9}" for m in METRICS))
    differ = []
    for name in common:
        diff = [v - expected[name][m] for m, v in zip(METRICS, measured[name])]
        # K std, plus the README's rounding to 3 decimals (a spread of 0.000 still allows ±0.0005)
        allowed = [k * spread[name][m] + 0.0005 if spread is not None else tol for m in METRICS]
        for what, values, fmt in (("README", expected[name].values(), "9.3f"), ("run", measured[name], "9.3f"),
                                  ("difference", diff, "+9.3f"), ("tolerance", allowed, "9.4f")):
            print(f"{name:{w}}  {what:10}" + "".join(f"{v:{fmt}}" if math.isfinite(v) else f"{'n/a':>9}"
                                                        for v in values))
        differ += [f"{name} {m}" for m, d, a in zip(METRICS, diff, allowed) if not abs(d) <= a + 1e-9]  # NaN differs
    for name in expected.keys() - measured.keys():
        print(f"not measured by these runs: {name}")
    print(f"differ beyond the tolerance: {', '.join(differ)}" if differ else "all within the tolerance")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="print the tables of the runs under DIR (with --readme and --name, also put "
                                     "them in that README block)")
    c = sub.add_parser("check", help="compare the runs under DIR with a README table; exit 1 beyond --tol")
    for p in (t, c):
        p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="searched recursively for results.json")
        p.add_argument("--by", action="append", default=[], metavar="KEY",
                       help="also split rows by this config key (dotted, e.g. n_epochs or editor.rank)")
    t.add_argument("--readme", type=Path, help="README whose block NAME gets the tables")
    t.add_argument("--name", help="the block: between <!-- table:NAME --> and <!-- /table:NAME -->")
    t.add_argument("--csv", type=Path, help="also write the rows as CSV here")
    t.add_argument("--made-by", metavar="CMD", help="the command that writes DIR, e.g. 'OUT=DIR scripts/real_lm.sh'")
    t.add_argument("--times", action="store_true", help="add each row's wall and CPU seconds per run")
    t.add_argument("--combined", action="store_true", help="one table with an m column instead of one per m")
    t.add_argument("--spread", choices=("seeds", "groups"), default="seeds",
                   help="the std in parentheses: over seeds (default), or over every validation group of every seed")
    c.add_argument("--readme", type=Path, default=ROOT / "README.md")
    c.add_argument("--name", default="default")
    c.add_argument("--tol", type=float, default=0.03, help="largest allowed |run - README| (default 0.03)")
    c.add_argument("--tol-std", type=float, metavar="K", help="instead: allow K times each README cell's std "
                                                              "(the number in parentheses: the measured spread)")
    args = parser.parse_args(argv)
    if args.cmd == "table" and (args.readme is None) != (args.name is None):
        parser.error("--readme and --name go together")
    try:
        tables = build_tables(read_runs(args.dirs, args.by), args.by, getattr(args, "spread", "seeds"))
        if args.cmd == "check":
            spread = read_block(args.readme, args.name, which=1) if args.tol_std is not None else None
            return check(tables, read_block(args.readme, args.name), args.tol, f"{args.readme}, table {args.name}",
                         spread, args.tol_std)
        text = markdown(tables, args.made_by, args.times, args.combined)
        print(text, end="")
        if args.csv:
            write_csv(csv_rows(tables), args.csv)
        if args.readme:
            replace_block(args.readme, args.name, text)
            print(f"{args.readme}: table {args.name} replaced", file=sys.stderr)
    except (OSError, ValueError) as err:  # AggregateError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

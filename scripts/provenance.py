"""Where a table's numbers come from, in words any machine can use: each row's command (rebuilt from the runs'
.hydra/overrides.yaml, its paths made portable: DIR, CACHE), the table's one command (the overrides every row shares,
written once), and one provenance line (commit range, machine, load, dates, from results.json `environment`).
Used by scripts/readme_tables.py.
"""
import math
import os
import shlex
import subprocess
from pathlib import Path

import yaml

from scripts.runs import AggregateError, Run

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["cache_dir"]  # relative to ROOT


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
    """DIR: the deepest folder holding the runs and the paths outside the repository that their overrides name."""
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
    """The override as any machine can run it: a path inside the repository relative to its root, one outside
    under DIR (`out`), cache_dir's as CACHE; None for cache_dir at the default cache."""
    key, _, value = override.partition("=")
    if not value.startswith("/"):
        return override
    path, cache = Path(value).resolve(), key.lstrip("+~") == "cache_dir"
    if path.is_relative_to(ROOT):
        value = path.relative_to(ROOT).as_posix()
        return None if cache and value == DEFAULT_CACHE else f"{key}={value}"
    return f"{key}={'CACHE' if cache else (Path('DIR') / path.relative_to(out)).as_posix()}"


def command(runs: list[Run], out: Path | None = None) -> str:
    """One `python main.py [-m] ...` that reruns these runs (values of a key merged: seed=0,1,2), its paths as
    `portable` writes them, under DIR = `out` (default: out_dir(runs))."""
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


def one_command(commands: list[str]) -> tuple[str, str]:
    """The rows' commands as one: (the command, what differs per row or ""). The overrides every row shares are
    written once; the keys whose values differ become a multirun over them when the rows are exactly that grid,
    else the second part names them (each row's own command is in summary.csv)."""
    parsed = [shlex.split(c)[2:] for c in commands if c.startswith("python main.py") and ";" not in c]
    if not parsed or len(parsed) < len(commands):
        return "; ".join(dict.fromkeys(commands)), ""
    parsed = [[o for o in p if o != "-m"] for p in parsed]
    shared = [o for o in parsed[0] if all(o in p for p in parsed)]
    rest = [[o for o in p if o not in shared] for p in parsed]
    values: dict[str, list[str]] = {}
    for p in rest:
        for o in p:
            k, _, v = o.partition("=")
            values.setdefault(k, []).extend(x for x in v.split(",") if x not in values[k])
    grid = all(len(p) == len(values) for p in rest) and math.prod(map(len, values.values())) == len(
        {tuple(sorted(p)) for p in rest})
    swept = grid and values and any(len(v) > 1 for v in values.values()) or any("," in o for o in shared)
    words = ["python main.py", *(["-m"] if swept else []), *map(shlex.quote, shared)]
    if grid:
        return " ".join(words + [shlex.quote(f"{k}={','.join(v)}") for k, v in values.items()]), ""
    keys = list(values)
    return " ".join(words), ", ".join(keys[:3]) + (f" and {len(keys) - 3} more keys" if len(keys) > 3 else "")


def _commit_order() -> dict[str, int]:
    """Short commit -> its position in this checkout's history (0: the newest); {} outside git."""
    try:
        out = subprocess.run(["git", "log", "--format=%h", "--abbrev=7"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {h: i for i, h in enumerate(out)}


def provenance(runs: list[Run]) -> str:
    """One line: the commit range, dates, machine(s) and load of the runs' recorded environment."""
    envs = [r.environment for r in runs if r.environment]
    if not envs:
        return "environment not recorded"
    order = _commit_order()
    commits = {e.get("commit") or "unknown" for e in envs} | {e["checkout_changed"]["commit"] or "unknown"
                                                             for e in envs if e.get("checkout_changed")}
    ranked = sorted(sorted(commits), key=lambda c: -order.get(c[:7], -1))  # oldest first; unknown ones first
    code = ranked[0] if len(ranked) == 1 else f"{ranked[0]} … {ranked[-1]} ({len(ranked)} commits)"
    if any(e.get("dirty") or (e.get("checkout_changed") or {}).get("dirty") for e in envs):
        code += ", with uncommitted changes"
    if any(e.get("checkout_changed") for e in envs):
        code += ", the checkout moving during some runs"
    machines = sorted({f"{e.get('cpu')}, {e.get('cpu_count')} cores, {e.get('threads')} torch thread(s), "
                       f"{'GPU ' + e['gpu'] if e.get('gpu') else 'no GPU'}, torch {e.get('torch')}" for e in envs})
    loads = [e["load_1min"] for e in envs if isinstance(e.get("load_1min"), (int, float))]
    dates = sorted(str(e.get("date"))[:10] for e in envs)
    parts = [f"code {code}", " / ".join(machines),
             "load " + "–".join(dict.fromkeys(f"{x:.1f}" for x in (min(loads), max(loads)))) if loads
             else "load not recorded", dates[0] + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")]
    missing = len(runs) - len(envs)
    return "; ".join(parts) + (f"; environment not recorded for {missing} of {len(runs)} runs" if missing else "")

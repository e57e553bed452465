"""The runs of a sweep: every results.json under a directory read into a Run, grouped over seeds into summary rows.

The one results pipeline that scripts/aggregate.py (the paper's CSV, plots and tables) and scripts/readme_tables.py
(the results/ data and the README's tables) share: the metric names; Run and its reading (read_run, find_runs;
AggregateError names the file and the field a results.json lacks); the long table, run x group x metric
(long_table); the one rule for the level before editing (levels_before); the one summary, whose spread is over
seeds or over validation groups as it says (summarize); write_csv; and how a row is named (label, row_order) and
printed (mean_std, seeds_title). Markdown tables are written by pipeline/report.markdown_table.
"""
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.registry import DISPLAY_NAMES

METRICS = ("ES", "GS", "LS")
COUNTERFACT = ("efficacy", "paraphrase", "neighborhood")  # data=counterfact runs only (model/lm.counterfact_scores)
# by greedy generation (data.generate; model/generate.py): results.json's `generated` {ES, GS, LS, unchanged}
GENERATED = ("ES_gen", "GS_gen", "LS_gen", "unchanged")
SCORES = METRICS + COUNTERFACT + GENERATED  # what a validation group reports (the last six in some runs only)
OPTIONAL = COUNTERFACT + GENERATED + ("residual", "cpu_time_s", "valid_groups", "generate_time_s")
STATS = SCORES + ("residual", "time_s", "cpu_time_s", "peak_memory_mb", "valid_groups", "generate_time_s")
VARIANTS = {"sum": "Sum param. shifts", "no_reg": "No regularization", "first_ffn": "Edit first FC in FFN",
            "all_tokens": "Cache all tokens", "none": "MALMEN"}  # Table 1 row order, MALMEN last
EDITORS = DISPLAY_NAMES  # editor -> its name in tables (config/editor/*.yaml, pipeline/registry.py)


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
    groups: dict | None = None  # METRICS (+ COUNTERFACT) -> one float per validation group (results.json "valid")

    @property
    def n_groups(self) -> int:
        """Validation groups in results.json "valid" (0 when not recorded)."""
        return len(next(iter(self.groups.values()))) if self.groups else 0

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


def _group_values(valid: list, names: tuple[str, ...], path: Path) -> dict[str, tuple[float, ...]]:
    """name -> its value in each validation group of results.json "valid"; AggregateError naming valid[i].name."""
    values: dict[str, tuple[float, ...]] = {}
    for name in names:
        per_group = [g.get(name) if isinstance(g, dict) else None for g in valid]
        for i, v in enumerate(per_group):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                field = f"generated.{name.removesuffix('_gen')}" if name in GENERATED else name
                raise AggregateError(path, f"valid[{i}].{field}", f"expected a number, got {v!r}")
        values[name] = tuple(map(float, per_group))
    return values


def flat(scores: dict) -> dict:
    """A results.json score dict with its `generated` scores as GENERATED names (ES_gen, ..., unchanged)."""
    gen = scores.get("generated")
    if not isinstance(gen, dict):
        return scores
    return {**{k: v for k, v in scores.items() if k != "generated"},
            **{name: gen.get(name.removesuffix("_gen")) for name in GENERATED}}


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
    final = _field(res, "final", path, dict)
    names = METRICS + tuple(k for k in COUNTERFACT if k in final) + (GENERATED if "generated" in final else ())
    where = {k: f"final.generated.{k.removesuffix('_gen')}" if k in GENERATED else f"final.{k}" for k in names}
    stats = {k: float(_field(res, where[k], path, num)) for k in names}
    stats.update({k: float(_field(res, k, path, num)) for k in ("time_s", "peak_memory_mb")})
    stats.update({k: float(_field(res, k, path, num)) for k in ("residual", "cpu_time_s") if k in res})
    if isinstance(res.get("generate_time_s"), list):  # seconds the generated scores added, over every group
        stats["generate_time_s"] = float(sum(res["generate_time_s"]))
    groups = None
    if isinstance(res.get("valid"), list):
        stats["valid_groups"] = float(len(res["valid"]))
        groups = _group_values([flat(g) if isinstance(g, dict) else g for g in res["valid"]], names, path)
    pre = ({k: float(_field(res, where[k].replace("final.", "pre_edit.", 1), path, num)) for k in names}
           if "pre_edit" in res else None)
    env = _field(res, "environment", path, dict) if res.get("environment") is not None else None
    m = _field(res, "config.data.n_edits", path, int)
    trained_m = _field(res, "trained.m", path, int) if res.get("trained") is not None else None
    return Run(path=path, result=str(result), model=model, data=data,
               editor=_field(res, "config.editor.name", path, str),
               variant=_field(res, "config.variant", path, str),
               m=m, seed=_field(res, "config.seed", path, int), stats=stats, pre_edit=pre, environment=env,
               config=res["config"], trained_m=None if trained_m == m else trained_m, groups=groups)


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every results.json under sweep_dir, sorted by path."""
    paths = sorted(sweep_dir.rglob("results.json"))
    if not paths:
        raise AggregateError(sweep_dir, None, "no results.json under this directory")
    return [read_run(p) for p in paths]


def long_table(runs: list[Run]) -> list[dict]:
    """The runs as one long table, run x group x metric: a record {run, group, phase, metric, value} per number.
    `group` is the validation group's index, or None for the run's own figure (results.json `final` and
    `pre_edit`, and the run-level stats: residual, times, memory); `phase` is "after" editing or "before"."""
    records = [{"run": r, "group": None, "phase": "after", "metric": k, "value": v} for r in runs
               for k, v in r.stats.items()]
    records += [{"run": r, "group": i, "phase": "after", "metric": k, "value": v} for r in runs
                for k, values in (r.groups or {}).items() for i, v in enumerate(values)]
    records += [{"run": r, "group": None, "phase": "before", "metric": k, "value": v} for r in runs
                for k, v in (r.pre_edit or {}).items()]
    return records


def levels_before(records: list[dict], tol: float = 1e-6) -> dict[tuple, dict[str, tuple[float, float]]]:
    """The one rule for "before editing": per setting (result, model, data, m), each metric's level as (mean, std
    over seeds, seeds). The runs of one seed edit the same validation groups, so their levels must agree (within
    `tol`): runs that disagree are refused (AggregateError naming both); a setting's level is the mean over its
    seeds, with its std over them. A metric some run of the setting lacks has no level."""
    per_seed: dict[tuple, dict[str, dict[int, tuple[float, Run]]]] = {}
    runs: dict[tuple, set] = {}  # setting -> its runs' paths
    having: dict[tuple, set] = {}  # (setting, metric) -> the paths of the runs with a level of it
    for rec in records:
        r = rec["run"]
        setting = (r.result, r.model, r.data, r.m)
        runs.setdefault(setting, set()).add(r.path)
        if rec["phase"] != "before":
            continue
        having.setdefault((setting, rec["metric"]), set()).add(r.path)
        seen = per_seed.setdefault(setting, {}).setdefault(rec["metric"], {})
        if r.seed in seen and not abs(rec["value"] - seen[r.seed][0]) <= tol:
            value, other = seen[r.seed]
            raise AggregateError(r.path, "pre_edit", f"{rec['metric']} {rec['value']:.6g} before editing, but "
                                 f"{value:.6g} in {other.path} (seed {r.seed}, same m): the runs edited other validation "
                                 "groups (another max_valid_steps or validation file) or measured them otherwise; put "
                                 "them in separate tables")
        seen.setdefault(r.seed, (rec["value"], r))
    return {setting: {k: (float(np.mean([v for v, _ in s.values()])), float(np.std([v for v, _ in s.values()])))
                      for k, s in metrics.items() if having[setting, k] == runs[setting]}  # every run has it
            for setting, metrics in per_seed.items()}


def summarize(runs: list[Run], spread: str = "seeds") -> list[dict]:
    """The one summary: a row per (result, model, data, editor, variant, m, trained_m) from the long table, with
    n, seeds, and per stat its mean over seeds and `{stat}_std`, its spread, which the row names (`spread`):
    "seeds", the std over the seeds' means, or "groups", the std over every validation group of every seed
    (pooled; scores only; the run-level stats keep the std over seeds). numpy's ddof=0. The level before editing
    (`pre_{stat}_mean`, `pre_{stat}_std` over seeds) is levels_before's, the same for every row of a setting."""
    if spread not in ("seeds", "groups"):
        raise ValueError(f"spread must be seeds or groups, got {spread!r}")
    records = long_table(runs)
    before = levels_before(records)
    settings: dict[tuple, list[Run]] = {}
    for run in runs:
        settings.setdefault(run.key, []).append(run)
    by_run: dict[tuple, list[dict]] = {}  # setting -> its records
    for rec in records:
        by_run.setdefault(rec["run"].key, []).append(rec)
    rows = []
    for key in sorted(settings, key=lambda k: (*k[:-1], k[-1] or 0)):  # trained_m: None or an int
        group = sorted(settings[key], key=lambda r: r.seed)
        for a, b in zip(group, group[1:]):
            if a.seed == b.seed:  # a re-run in the same tree would be counted twice
                raise AggregateError(b.path, "config.seed", f"seed {b.seed} of the same setting also in {a.path} (a "
                                     "training run and its evaluation from the checkpoint, say): pass one of the two")
        mine = [rec for rec in by_run[key] if rec["phase"] == "after"]
        row = dict(zip(("result", "model", "data", "editor", "variant", "m", "trained_m"), key))
        row.update(n=len(group), seeds=" ".join(str(r.seed) for r in group), spread=spread)
        for stat in STATS:
            values = [rec for rec in mine if rec["metric"] == stat and rec["group"] is None]
            if values and len(values) < len(group):
                lacking = next(r for r in group if stat not in r.stats)
                raise AggregateError(lacking.path, stat, f"missing, but present in {values[0]['run'].path}")
            means = np.array([rec["value"] for rec in values])
            pooled = [rec["value"] for rec in mine if rec["metric"] == stat and rec["group"] is not None]
            every = all(r.groups and stat in r.groups for r in group)
            row[f"{stat}_mean"] = float(means.mean()) if values else None
            row[f"{stat}_std"] = (float(means.std()) if values else None) if spread == "seeds" or stat not in SCORES \
                else (float(np.std(pooled)) if every and pooled else None)
        row["n_groups"] = sum(r.n_groups for r in group) if all(r.groups for r in group) else None
        level = before.get(key[:3] + (key[5],), {})
        for stat in SCORES:
            row[f"pre_{stat}_mean"], row[f"pre_{stat}_std"] = level.get(stat, (None, None))
        rows.append(row)
    return rows


def _rounded(value, digits: int = 4):
    """CSV cells for reading: floats to `digits` significant decimals; non-finite as 'nan'/'inf'."""
    if isinstance(value, float) and math.isfinite(value):
        return round(value, digits)
    return value


def write_csv(rows: list[dict], path: Path, digits: int = 4) -> None:
    """A summary CSV, rounded to `digits` decimals for reading; absent stats (the residual of editors without one)
    are empty cells."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _rounded(v, digits) for k, v in row.items()} for row in rows)


# ----- naming and printing rows -----------------------------------------------------------------------------------
def label(row: dict, with_setting: bool = False) -> str:
    """Legend label: the editor (or the ablation variant of MALMEN), with model/data if needed, and the m its
    hyper-network was trained at when it edited another m."""
    name = EDITORS.get(row["editor"], row["editor"])
    if row["variant"] != "none":
        name = VARIANTS.get(row["variant"], row["variant"]) if row["editor"] == "malmen" else f"{name} ({row['variant']})"
    if row.get("trained_m") is not None:
        name += f" (trained at m = {row['trained_m']})"
    return f"{name} [{row['model']}/{row['data']}]" if with_setting else name


def row_order(editor: str, variant: str) -> tuple:
    """Table 1's row order: other editors first, then MALMEN's ablations, MALMEN itself last."""
    return editor == "malmen", list(VARIANTS).index(variant) if variant in VARIANTS else -1, editor, variant


def mean_std(mean: float, std: float | None, digits: int, scale: float = 1.0, why: str = "non-finite") -> str:
    """'mean (std)' (std None: the mean alone); 'n/a (why)' when either is NaN or infinite."""
    if not all(math.isfinite(v) for v in (mean, std) if v is not None):
        return f"n/a ({why})"
    return f"{scale * mean:.{digits}f}" + ("" if std is None else f" ({scale * std:.{digits}f})")


def seeds_title(rows: list[dict], title: str) -> str:
    """A figure's or table's title with the number of seeds behind each point."""
    n = sorted({r["n"] for r in rows})
    return f"{title} (mean ± std over {'/'.join(map(str, n))} seed{'s' if n != [1] else ''})"

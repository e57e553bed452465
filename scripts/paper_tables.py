"""The paper's tables in Markdown, from summary rows (scripts/runs.summarize).

single_m_table: a result with one m, where a curve would be one dot (rows x before editing, ES, GS, LS).
ablation_table: the layout of Tables 1 and 2 (variants x (setting, ES/GS/LS in %[, time in h])).
massive_table: the massive-editing experiment, a row per (m, editor) with CounterFact's scores and the time.
"""
from pipeline.report import markdown_table
from scripts.runs import COUNTERFACT, GENERATED, METRICS, label, mean_std, row_order, seeds_title


def single_m_table(rows: list[dict], title: str) -> str:
    """Markdown for a result with one m, where a curve would be one dot: rows x (before, ES, GS, LS)."""
    rows = sorted(rows, key=lambda r: row_order(r["editor"], r["variant"]))
    several = len({(r["model"], r["data"]) for r in rows}) > 1
    scores = METRICS + tuple(s for s in GENERATED if all(r[f"{s}_mean"] is not None for r in rows))
    stats = scores + (("residual",) if any(r["residual_mean"] is not None for r in rows) else ())
    pre = rows[0]  # the level before editing (runs.levels_before): the same in every row of one m
    before = [["before editing", "", *(f"{pre[f'pre_{s}_mean']:.3f}" for s in scores),
               *([""] * (len(stats) - len(scores)))]] if all(pre[f"pre_{s}_mean"] is not None for s in scores) else []
    body = [[label(r, several), r["n"], *("–" if r[f"{s}_mean"] is None else mean_std(r[f"{s}_mean"], r[f"{s}_std"], 3)
                                          for s in stats)] for r in rows]
    lines = [f"**{seeds_title(rows, title)}**, m = {rows[0]['m']}", "",
             *markdown_table(["", "seeds", *stats], before + body)]
    return "\n".join(lines) + "\n"


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
    head = ["Variant"]
    for data, model, m in settings:
        for stat in stats:
            name = "Time (h) ↓" if stat == "time_s" else f"{stat} (%) ↑"
            head.append(f"{data}, m = {m}: {model} {name}" if stat == "ES" else name)
    before = ["Before editing"]  # the unedited model's level, per setting (time: –)
    for data, model, m in settings:
        pre = next(r for r in rows if (r["data"], r["model"], r["m"]) == (data, model, m))
        for stat in stats:
            before.append("–" if stat == "time_s" or pre[f"pre_{stat}_mean"] is None
                          else f"{100 * pre[f'pre_{stat}_mean']:.1f}")
    body = [before]
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
        body.append(cells)
    n = sorted(c for c in counts if c is not None)
    lines = [f"**{title}** (mean (std) over seeds)", "", *markdown_table(head, body, right=True),
             "", f"Seeds per cell: {', '.join(map(str, sorted(set(n))))}. – : no run finished."]
    return "\n".join(lines) + "\n"


def massive_table(rows: list[dict], title: str) -> str:
    """Markdown for the massive-editing experiment: a row per (m, editor), "before editing" first, with ES/GS/LS,
    CounterFact's three scores as mean (std over every validation group of every seed, pooled; one group: the
    mean alone), validation groups, wall and CPU time per run."""
    stats = METRICS + COUNTERFACT + tuple(s for s in GENERATED if any(r[f"{s}_mean"] is not None for r in rows))
    head = ["m", "editor", *stats, "groups x seeds", "wall s", "CPU s"]
    seeds = sorted({r["n"] for r in rows})
    body = []
    for m in sorted({r["m"] for r in rows}):
        at_m = sorted((r for r in rows if r["m"] == m), key=lambda r: row_order(r["editor"], r["variant"]))
        body.append([m, "before editing", *("-" if at_m[0][f"pre_{s}_mean"] is None else f"{at_m[0][f'pre_{s}_mean']:.3f}"
                                            for s in stats), "", "", ""])  # the same in every row of one m
        for r in at_m:
            spread = (r.get("n_groups") or 0) > 1  # summarize(spread="groups"): the std over validation groups
            cells = ["-" if r[f"{s}_mean"] is None else
                     mean_std(r[f"{s}_mean"], r[f"{s}_std"] if spread else None, 3) for s in stats]
            groups = "-" if r["valid_groups_mean"] is None else f"{r['valid_groups_mean']:.0f} x {r['n']}"
            cpu = "-" if r["cpu_time_s_mean"] is None else f"{r['cpu_time_s_mean']:.0f}"
            body.append([m, label(r), *cells, groups, f"{r['time_s_mean']:.0f}", cpu])
    return "\n".join([f"**{title} (mean (std over validation groups x {'/'.join(map(str, seeds))} seed"
                      f"{'s' if seeds != [1] else ''}))**", "", *markdown_table(head, body)]) + "\n"

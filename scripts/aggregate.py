"""Aggregate a sweep: every results.json under a directory -> CSV, the paper's plots and tables.

python scripts/aggregate.py SWEEP_DIR [--out DIR]     (DIR defaults to SWEEP_DIR)

Runs are grouped by (paper_result, model, data, editor, variant, m, the m a hyper-network evaluated at another m
was trained at); seeds are the repeats. Such rows are labelled "(trained at m = X)". Writes
- summary.csv: scripts/runs.summarize's rows: n, seeds, mean and std (numpy's ddof=0; over seeds, or for
  massive_counterfact over validation groups: the `spread` column says which) of ES, GS, LS, residual, time_s
  and peak_memory_mb per group, and the level before editing (pre_*: runs.levels_before), rounded to 4 decimals;
- <result>.png per scaling curve (ES, GS, LS against m on a log2 axis, mean line, std shaded, the
  level before editing dashed); a result with a single m is a table, <result>.md, instead;
  <result>_residual.png when the runs recorded the Fig. 8 residual; fig8_residual.png for Fig. 8;
- table1.md and table2.md in the layout of the paper's Tables 1 and 2 (mean (std), in %), and
  toy_table.md in Table 1's layout for the toy (experiment=toy_table, scripts/sweep.sh toy_table);
- real_lm_zsre.md in that layout, one column group per m (a row per editor, "Before editing" first), beside
  its curve real_lm_zsre.png (scripts/real_lm.sh);
- massive_counterfact.md: a row per (m, editor) with ES/GS/LS, CounterFact's efficacy, paraphrase and
  neighborhood scores, the groups, wall and CPU time, beside massive_counterfact.png, six panels against m
  (scripts/massive_counterfact.sh). CounterFact runs carry those scores in every table and plot.
A results.json that cannot be read or lacks a field stops it with the file and the field (exit 2).
The runs and their summary rows come from scripts/runs.py, the figures from scripts/plots.py, the Markdown
tables from scripts/paper_tables.py; this file routes each result to them.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.paper_tables import ablation_table, massive_table, single_m_table  # noqa: E402
from scripts.plots import plot_residual, plot_scaling  # noqa: E402
from scripts.runs import AggregateError, find_runs, summarize, write_csv  # noqa: E402

TABLES = ("table1", "table2", "toy_table", "real_lm_zsre", "massive_counterfact")  # paper_result values written as Markdown tables ...
PLOTTED_TABLES = ("real_lm_zsre", "massive_counterfact")  # ... and, for these, as a curve over m as well
SPREAD = {"massive_counterfact": "groups"}  # the std over validation groups (one group per seed at m = 1024); else seeds
TITLES = {"fig4_bert_fever": "Fig. 4: BERT-base on FEVER", "fig5_gpt2_zsre": "Fig. 5: GPT-2 on zsRE",
          "fig6_t5xl_zsre": "Fig. 6: T5-XL on zsRE", "fig7_gptj_zsre": "Fig. 7: GPT-J on zsRE",
          "fig8_residual": "Fig. 8: cancellation effect", "table1": "Table 1: ablation study",
          "table2": "Table 2: ablation study on GPT-J",
          "toy_table": "Default experiment: toy GPT-2 on the synthetic world",
          "real_lm_zsre": "A real pretrained LM on zsRE ({setting})"}  # {setting}: model / data of the runs


def aggregate(sweep_dir: Path, out_dir: Path) -> list[Path]:
    """Read every run under sweep_dir and write the CSV, plots and tables to out_dir; returns the files."""
    runs = find_runs(sweep_dir)
    rows = [row for result in sorted({r.result for r in runs})  # the spread each result's tables show
            for row in summarize([r for r in runs if r.result == result], SPREAD.get(result, "seeds"))]
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

"""What a run prints and writes for a person to read: results.md, the terminal table, the warning
that an edit did nothing, and the clean-up of a refused run's output directory."""
import shutil
from pathlib import Path

# what model/lm.py `accuracy` computes per tuple, averaged over the group's tuples (experiment.evaluate)
METRIC_MEANINGS = {
    "ES": "edit success: the teacher-forced token accuracy of the new answer after the edit prompt (the share of "
          "its tokens that are the model's argmax; FEVER: whether the classifier gives the new label)",
    "GS": "generalisation success: the same after an equivalent (rephrased) prompt",
    "LS": "locality success: the same for an unrelated prompt and its own answer in the data (zsRE: the NQ "
          "answer; FEVER: the claim's gold label), as in the paper; not whether the model's answer is unchanged, "
          "so it can rise after editing",
}
# CounterFact's own scores (model/lm.counterfact_scores; Meng et al. 2022, as MEMIT and AlphaEdit report them)
COUNTERFACT_MEANINGS = {
    "efficacy": "the share of edit prompts after which the new answer is more probable than the true one "
                "(whole answers: the sum of their tokens' log-probabilities; data.score_reduction)",
    "paraphrase": "the same after the rephrased prompts",
    "neighborhood": "the share of neighborhood prompts (other subjects, the same relation and true answer) after "
                    "which the true answer is still more probable than the new one",
}
METRICS = ("ES", "GS", "LS", *COUNTERFACT_MEANINGS)  # what a validation group reports (the last three: CounterFact)
# data.generate: `generated` {ES, GS, LS, unchanged} beside them (model/generate.py)
GENERATED_MEANINGS = {
    "ES, GS, LS by generation": "the share of tuples whose greedy decoding from the prompt, for as many tokens as the "
                                "answer has, is the answer token for token (no partial credit, no gold prefix)",
    "unchanged": "the share of unrelated prompts whose greedy continuation, at their answer's length, is the same "
                 "after the edit as before it (a measure of disturbance; 1 before editing)",
}


def trained_label(results: dict) -> str | None:
    """'trained at m = X' when the run's hyper-network was meta-trained at another m than it edited (the
    `trained` record of results.json; editor.allow_other_m=true), else None. Every table shows it."""
    trained = results.get("trained")
    return f"trained at m = {trained['m']}" if trained and trained["m"] != results["config"]["data"]["n_edits"] else None


def markdown_table(head: list, rows: list[list], right: bool = False) -> list[str]:
    """The one Markdown table writer (results.md, the aggregate and README tables, both benchmarks): the header,
    the rule (`right`: numbers right-aligned after the first column) and a line per row, cells as str."""
    line = lambda cells: "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"  # noqa: E731
    rule = ["---"] + ["---:" if right else "---"] * (len(head) - 1)
    return [line(head), "|" + "|".join(rule) + "|", *map(line, rows)]


def _table(rows: dict[str, dict]) -> list[str]:
    """Markdown rows of ES/GS/LS (and CounterFact's scores when present), one per named state ('-' for a
    metric that does not apply)."""
    names = [k for k in METRICS if k in ("ES", "GS", "LS") or any(k in (v or {}) for v in rows.values())]
    return markdown_table(["", *names], [[name, *("-" if values.get(k) is None else f"{values[k]:.3f}" for k in names)]
                                         for name, values in rows.items()])


def _generated_table(rows: dict[str, dict]) -> list[str]:
    """Markdown rows of the generated scores (ES, GS, LS, unchanged), one per named state."""
    names = ("ES", "GS", "LS", "unchanged")
    return markdown_table(["", *names], [[name, *(f"{v[k]:.3f}" for k in names)] for name, v in rows.items()])


def no_gain_warning(pre: dict | None, post: dict | None, editor: str) -> str | None:
    """A plain warning when editing did not raise ES, None otherwise (and without metrics: no validation)."""
    if not pre or not post or pre.get("ES") is None or post.get("ES") is None:
        return None
    if post["ES"] > pre["ES"] or pre["ES"] >= 1.0:
        return None  # it rose, or there was nothing left to raise
    return (f"warning: editor {editor} did not raise ES (before {pre['ES']:.3f}, after {post['ES']:.3f}): "
            "the edits did not take. The tiny random models run the code, not the method (docs/experiments.md); "
            "for the others, the README's results and results.md's diagnostics say what to expect.")


def results_markdown(results: dict, run_dir: Path) -> str:
    """results.md of a training/validation run: pre -> post table, meanings, time, memory, files."""
    cfg = results["config"]
    lines = [f"# {cfg['editor']['name']} on {cfg['model']['name']} / {cfg['data']['name']}, "
             f"m = {cfg['data']['n_edits']}, seed {cfg['seed']}", ""]
    if results["final"] is None:  # max_valid_steps=0
        lines.append("No validation (max_valid_steps=0): ES, GS and LS were not measured. Validate the "
                     "checkpoint with editor.checkpoint=PATH n_epochs=0.")
    else:
        lines += _table({"before editing": results["pre_edit"], "after editing": results["final"]})
        meanings = {**METRIC_MEANINGS, **{k: v for k, v in COUNTERFACT_MEANINGS.items() if k in results["final"]}}
        if "generated" in results["final"]:
            lines += ["", "By greedy generation (data.generate):", ""]
            lines += _generated_table({"before editing": results["pre_edit"]["generated"],
                                       "after editing": results["final"]["generated"]})
            meanings.update(GENERATED_MEANINGS)
        lines += [""] + [f"- **{k}**: {v}." for k, v in meanings.items()]
        lines.append(f"- Means over {len(results['valid'])} validation group(s) of m edits, each edited at once.")
        if trained_at := trained_label(results):
            lines.append(f"- The hyper-network was {trained_at}, not at this run's m (editor.allow_other_m=true).")
        if cfg.get("curriculum") and results["train"]:
            lines.append(f"- Meta-trained by the curriculum {cfg['curriculum']} ([m, meta-steps] per stage).")
    if "residual" in results:
        lines.append(f"- Mean residual ‖S*u − d‖ / ‖d‖ (Fig. 8): {results['residual']:.3g}.")
    lines += diagnostics_lines([v["editor"] for v in results["valid"] if v.get("editor")], cfg["editor"])
    warning = no_gain_warning(results["pre_edit"], results["final"], cfg["editor"]["name"])
    if warning:
        lines.append(f"- **{warning}**")
    lines += ["", f"Time {results['time_s']:.1f} s; peak memory {results['peak_memory_mb']:.0f} MB "
              f"({'GPU allocated' if str(cfg.get('model_device', 'cpu')).startswith('cuda') else 'RSS'})."]
    checkpoint, loaded = run_dir / "checkpoint.pt", cfg["editor"].get("checkpoint")
    if loaded:
        lines.append(f"Editor checkpoint loaded: `{loaded}`" + (f"; trained on, written to `{checkpoint}`."
                                                               if checkpoint.is_file() else "."))
    else:
        lines.append(f"Editor checkpoint: `{checkpoint}`." if checkpoint.is_file() else
                     "No editor checkpoint (this editor does not meta-train).")
    lines.append(f"Everything else, the resolved config included: `{run_dir / 'results.json'}`.")
    return "\n".join(lines) + "\n"


def _number(x: float | None, fmt: str) -> str:
    return "n/a (not finite)" if x is None else format(x, fmt)


def _solve_line(groups: list[dict], n: int) -> str:
    """MEMIT/EMMET's `solve` diagnostics of every group (of n edits in all) in one line, weighted by the
    requests that asked for a change (`moved`); a group none of whose requests did has no ratios."""
    s = [x for x in groups if x["moved"]]
    moved = sum(x["moved"] for x in s)
    if not s:
        return "- Edited model against z: no edit asked for a change (every z was already h: the loss met stop_loss)."
    gap = None if any(x["z_gap_mean"] is None for x in s) else sum(x["z_gap_mean"] * x["moved"] for x in s) / moved
    worst = [x["z_gap_max"] for x in s]
    last = [list(x["residual"].values())[-1] for x in s]  # the last layer's: it takes the rest of z - h
    skipped = n - moved
    return (f"- Edited model against z ({moved} edits that asked for a change"
            + (f"; {skipped} whose z was already h left out" if skipped else "") + "): after the edit, |z - h| at the "
            f"bare prompts is {_number(gap, '.1%')} of what it was on average (worst "
            f"{_number(None if None in worst else max(worst), '.1%')}); the last layer's solve missed its share "
            f"of z - h by {_number(None if None in last else max(last), '.1%')} (mean over edits; the worst group's). "
            "Every layer's: results.json, `solve`.")


def diagnostics_lines(rows: list[dict], editor: dict) -> list[str]:
    """results.md lines from the validation groups' editor diagnostics (Editor.diagnostics): what bounded
    the edit. MEMIT/EMMET: their target vectors z and how near the edited model came to them, weighted by
    edits; LocFT-BF: epochs, steps, losses."""
    if not rows:
        return []
    if "targets" in rows[0]:
        t = [r["targets"] for r in rows]
        n = sum(x["n"] for x in t)

        def mean(key):  # over edits; None if any group's value was not finite
            values = [x[key] for x in t]
            return None if None in values else sum(v * x["n"] for v, x in zip(values, t)) / n
        worst = [x["nll_max"] for x in t]
        lines = [f"- Target vectors z ({n} edits): {mean('converged'):.1%} reached the stop loss "
                 f"({editor.get('stop_loss')}), {mean('at_clamp'):.1%} ended at the clamp |δ| = "
                 f"{editor.get('clamp_factor')}·|h|; the answer's NLL at z was {_number(mean('nll_mean'), '.3f')} "
                 f"nats per token on average (worst {_number(None if None in worst else max(worst), '.3f')}), "
                 f"after {mean('steps'):.1f} of at most {editor.get('n_steps')} losses (per group: results.json)."]
        if "solve" in rows[0]:
            lines.append(_solve_line([r["solve"] for r in rows], n))
        return lines
    if "epochs" in rows[0]:
        def spread(values: list, fmt: str = "") -> str:  # every group's value, or the range of many
            if len(values) > 3 and None not in values:
                return f"{format(min(values), fmt)}–{format(max(values), fmt)} over {len(values)} groups"
            return ", ".join(_number(v, fmt) for v in values)
        return [f"- LocFT-BF: {spread([r['epochs'] for r in rows])} epoch(s) of at most {editor.get('n_epochs')} "
                f"({spread([r['steps'] for r in rows])} Adam steps) per group; the last epoch's loss "
                f"{spread([r['epoch_losses'][-1] for r in rows], '.3g')} nats per target token (early stop under "
                f"{editor.get('loss_threshold')}). Each epoch's loss: results.json."]
    return []


def edit_markdown(results: dict) -> str:
    """results.md of mode=edit: the facts before and after, and where the edited model went."""
    lines = [f"# mode=edit: {results['n_facts']} facts, {results['n_rephrases']} rephrasings, "
             f"editor {results['editor']['name']}", ""]
    lines += _table({"before editing": results["before"], "after editing": results["after"]})
    lines += ["", f"- **ES**: {METRIC_MEANINGS['ES']}.", f"- **GS**: {METRIC_MEANINGS['GS']} ('-': no rephrasings).",
              "- LS is not measured: a facts file has no unrelated prompts."]
    warning = no_gain_warning(results["before"], results["after"], results["editor"]["name"])
    if warning:
        lines.append(f"- **{warning}**")
    if results.get("diagnostics"):  # per edit as in a run's results.md (provenance.json: `diagnostics`)
        lines += diagnostics_lines([results["diagnostics"]], results["config"]["editor"])
    lines += ["", f"Time {results['time_s']:.1f} s. Edited model: `{results['out_dir']}` (with provenance.json); "
              "reload it with `" + " ".join(results["reload"]) + "`."]
    return "\n".join(lines) + "\n"


def terminal_summary(results: dict, mode: str, run_dir: Path) -> str:
    """What a finished run prints: the ES/GS(/LS) table before and after editing, and where the files are."""
    if mode == "edit":  # GS is '-' when no fact has rephrasings
        lines = [f"\n{results['n_facts']} facts, {results['n_rephrases']} rephrasings", f"{'':8}{'ES':>8}{'GS':>8}"]
        lines += [f"{row:8}" + "".join(f"{'-':>8}" if v is None else f"{v:8.3f}" for v in results[row].values())
                  for row in ("before", "after")]
        lines.append(f"edited model in {results['out_dir']} (provenance.json); load it with "
                     + " ".join(results["reload"]))
        return "\n".join(lines + [f"summary in {run_dir / 'results.md'}"])
    f, p = results["final"], results["pre_edit"]
    names = [k for k in METRICS if f is not None and k in f]  # ES, GS, LS (and CounterFact's scores)
    width = [max(8, len(k) + 2) for k in names]
    lines = ["\nno validation (max_valid_steps=0)"] if f is None else \
        ["\n" + f"{'':8}" + "".join(f"{k:>{w}}" for k, w in zip(names, width))] + \
        [f"{row:8}" + "".join(f"{v[k]:{w}.3f}" for k, w in zip(names, width)) for row, v in (("pre", p), ("post", f))]
    if f is not None and "generated" in f:  # greedy generation's scores (data.generate)
        g = ("ES", "GS", "LS", "unchanged")
        lines += [f"{'generated':9}" + f"{'ES':>7}" + "".join(f"{k:>8}" for k in g[1:3]) + f"{'unchanged':>11}"]
        lines += [f"{row:8}" + "".join(f"{v['generated'][k]:8.3f}" for k in g[:3]) + f"{v['generated']['unchanged']:11.3f}"
                  for row, v in (("pre", p), ("post", f))]
    if trained_at := trained_label(results):
        lines.append(f"the hyper-network was {trained_at} (editor.allow_other_m=true)")
    lines.append(f"time {results['time_s']:.1f} s, peak memory {results['peak_memory_mb']:.0f} MB, "
                 f"results in {run_dir} (results.md, results.json)")
    return "\n".join(lines)


def remove_if_empty(run_dir: Path, refused: bool = False) -> bool:
    """Remove a run directory that holds only Hydra's .hydra/ and an empty log (the litter of a run that
    stopped before doing anything). `refused`: the run was refused for bad input; then a log with lines
    goes too, as it holds only the warnings about that input, which the terminal showed (Hydra logs to
    both). Anything else in the directory (a checkpoint, results, wandb/) keeps it."""
    if not run_dir.is_dir():
        return False
    for p in run_dir.iterdir():
        if p.name == ".hydra" or (p.suffix == ".log" and p.is_file() and (refused or p.stat().st_size == 0)):
            continue
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True

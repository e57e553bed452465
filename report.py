"""What a run prints and writes for a person to read: results.md, the terminal table, the warning
that an edit did nothing, and the clean-up of a refused run's empty output directory."""
import shutil
from pathlib import Path

METRIC_MEANINGS = {
    "ES": "edit success: the edited model gives the new answer to the edit prompt",
    "GS": "generalisation success: it gives the new answer to an equivalent (rephrased) prompt",
    "LS": "locality success: its answer to an unrelated prompt is unchanged",
}


def _table(rows: dict[str, dict]) -> list[str]:
    """Markdown rows of ES/GS/LS, one per named state ('-' for a metric that does not apply)."""
    lines = ["| | ES | GS | LS |", "|---|---|---|---|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join("-" if values.get(k) is None else f"{values[k]:.3f}"
                                               for k in ("ES", "GS", "LS")) + " |")
    return lines


def no_gain_warning(pre: dict, post: dict, editor: str) -> str | None:
    """A plain warning when editing did not raise ES, None otherwise."""
    if pre.get("ES") is None or post.get("ES") is None or post["ES"] > pre["ES"] or pre["ES"] >= 1.0:
        return None  # it rose, or there was nothing left to raise
    return (f"warning: editor {editor} did not raise ES (before {pre['ES']:.3f}, after {post['ES']:.3f}): "
            "the edits did not take. See the README's results for this editor and model.")


def results_markdown(results: dict, run_dir: Path) -> str:
    """results.md of a training/validation run: pre -> post table, meanings, time, memory, files."""
    cfg = results["config"]
    lines = [f"# {cfg['editor']['name']} on {cfg['model']['name']} / {cfg['data']['name']}, "
             f"m = {cfg['data']['n_edits']}, seed {cfg['seed']}", ""]
    lines += _table({"before editing": results["pre_edit"], "after editing": results["final"]})
    lines += [""] + [f"- **{k}**: {v}." for k, v in METRIC_MEANINGS.items()]
    lines.append(f"- Means over {len(results['valid'])} validation group(s) of m edits, each edited at once.")
    if "residual" in results:
        lines.append(f"- Mean residual ‖S*u − d‖ / ‖d‖ (Fig. 8): {results['residual']:.3g}.")
    warning = no_gain_warning(results["pre_edit"], results["final"], cfg["editor"]["name"])
    if warning:
        lines.append(f"- **{warning}**")
    lines += ["", f"Time {results['time_s']:.1f} s; peak memory {results['peak_memory_mb']:.0f} MB "
              f"({'GPU allocated' if str(cfg.get('model_device', 'cpu')).startswith('cuda') else 'RSS'})."]
    checkpoint = run_dir / "checkpoint.pt"
    lines.append(f"Editor checkpoint: `{checkpoint}`." if checkpoint.is_file() else
                 "No editor checkpoint (this editor does not meta-train).")
    lines.append(f"Everything else, the resolved config included: `{run_dir / 'results.json'}`.")
    return "\n".join(lines) + "\n"


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
    lines += ["", f"Time {results['time_s']:.1f} s. Edited model: `{results['out_dir']}` (with provenance.json); "
              "reload it with `" + " ".join(results["reload"]) + "`."]
    return "\n".join(lines) + "\n"


def remove_if_empty(run_dir: Path) -> bool:
    """Remove a run directory that holds only Hydra's .hydra/ and an empty log (a refused run's litter)."""
    if not run_dir.is_dir():
        return False
    for p in run_dir.iterdir():
        if p.name == ".hydra" or (p.suffix == ".log" and p.stat().st_size == 0):
            continue
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True

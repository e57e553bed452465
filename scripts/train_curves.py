"""Meta-training as it went: the learning curve, eta and lambda per layer, and the meta losses, against meta-steps.

python scripts/train_curves.py RUN_DIR [RUN_DIR ...] [--out FILE.png]

A RUN_DIR is a MALMEN/MEND run directory: its results.json (`train`: eta and lambda per layer after every step;
`curve`: the scores every eval_every steps), or, for a run still going or interrupted, its checkpoint.pt (the train
log) and curve.json. Four panels share the step axis: the scores of the learning curve (ES, GS, and CounterFact's
efficacy, paraphrase and neighborhood, and the generated ES and "unchanged" where measured), eta of each edited
layer and lambda of each (log axes; at step 0 the values eta_search and lambda_rel set), and L_gen and L_loc. Without --out the figure goes to the first run's
directory as train_curves.png.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

SCORES = ("ES", "GS", "LS", "efficacy", "paraphrase", "neighborhood")
GENERATED = ("ES", "GS", "LS", "unchanged")  # results.json `generated`: ES_gen, GS_gen, LS_gen, unchanged


def read(run: Path) -> tuple[list[dict], list[dict], list[str], dict]:
    """(train log, curve, edited modules, calibrated) of a run directory; SystemExit naming the directory when it
    has neither results.json nor checkpoint.pt."""
    if (run / "results.json").is_file():
        res = json.loads((run / "results.json").read_text())
        modules = res.get("config", {}).get("editor", {}).get("modules") or []
        return res.get("train") or [], res.get("curve") or [], modules, res.get("calibrated") or {}
    if (run / "checkpoint.pt").is_file():
        import torch
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        curve = json.loads((run / "curve.json").read_text()) if (run / "curve.json").is_file() else []
        modules = state.get("config", {}).get("editor", {}).get("modules") or []
        return state.get("train_log", []), curve, modules, state.get("calibrated") or {}
    sys.exit(f"error: {run}: no results.json or checkpoint.pt (a MALMEN/MEND run directory)")


def plot(runs: list[Path], out: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    styles = ("-", "--", ":", "-.")
    for i, run in enumerate(runs):
        log, curve, modules, calibrated = read(run)
        tag, ls = (f"{run.name}: " if len(runs) > 1 else ""), styles[i % len(styles)]
        steps = [c["step"] for c in curve]
        for name in SCORES:
            if curve and name in curve[0]:
                axes[0].plot(steps, [c[name] for c in curve], ls, marker=".", label=tag + name)
        for name in GENERATED:
            if curve and "generated" in curve[0]:
                axes[0].plot(steps, [c["generated"][name] for c in curve], ls, marker="x", markersize=8,
                             label=tag + (name if name == "unchanged" else f"{name}_gen"))
        rows = [r for r in log if "eta" in r]
        start = {"eta": calibrated.get("eta"), "lambda": calibrated.get("lambda")}  # step 0: set before step 1
        for key, ax in (("eta", axes[1]), ("lambda", axes[2])):
            for j in range(len(rows[0][key]) if rows else 0):
                name = modules[j] if j < len(modules) else f"layer {j}"
                first = start[key] if not isinstance(start[key], dict) else start[key].get(name)
                xs, values = [r["step"] for r in rows], [r[key][j] for r in rows]
                if first is not None:
                    xs, values = [0, *xs], [first, *values]
                if all(v > 0 for v in values):
                    ax.plot(xs, values, ls, label=tag + name)
        for key in ("gen_loss", "loc_loss"):
            axes[3].plot([r["step"] for r in log], [r[key] for r in log], ls, label=tag + key)
    titles = ("scores (validation groups of the curve)", "eta per edited layer", "lambda per edited layer",
              "meta losses")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("meta-step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[1:3]:
        if ax.lines:
            ax.set_yscale("log")
    axes[3].set_yscale("log")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="MALMEN/MEND run directories")
    p.add_argument("--out", type=Path, help="the PNG (default: RUN_DIR/train_curves.png of the first run)")
    args = p.parse_args(argv)
    out = args.out or args.runs[0] / "train_curves.png"
    plot(args.runs, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

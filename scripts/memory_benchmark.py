"""Fig. 9: peak memory of one meta-training step against m, two-stage (MALMEN) vs end-to-end (MEND-style).

python scripts/memory_benchmark.py [--model gpt2] [--m 32 64 128 ...] [--device cpu|cuda] [--out DIR]

Each (m, procedure) runs ONE `MALMEN.meta_step` in a fresh subprocess, because a process's peak RSS
never goes down. The two-stage procedure (Alg. 2) back-propagates the LM and the hyper-network
separately, batch by batch; the end-to-end one (Fig. 1) attaches the hyper-network to the LM and
back-propagates once through both, so it keeps every LM batch's graph at once. Memory is the peak
RSS of the process on CPU (model and editor included) and `torch.cuda.max_memory_allocated` on a
GPU. `--model gpt2` is the GPT-2 (124M) architecture with random weights (nothing is downloaded);
a model with a `tiny` config (tiny-gpt2) is built as in the tests. The editor is config/editor/malmen
(A.6: rank 1920) on the model's edit_modules, built as a run builds it (experiment.build_editor). Edit
tuples are random token ids with the lengths of an average zsRE tuple under GPT-2's tokenizer (prompt 11,
answer 3 tokens, measured on zsre_mend_train-1k.json), so the cached tokens and LM activations scale as on
zsRE.
Writes memory.csv, memory.md and memory.png (Fig. 9) to --out.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.groups import EditGroup  # noqa: E402
from data.records import EditRecord  # noqa: E402
from editor.malmen import MALMEN  # noqa: E402
from model.load import load_model  # noqa: E402
from pipeline.experiment import build_editor  # noqa: E402
from pipeline.report import markdown_table  # noqa: E402
from util import atomic_write, peak_memory_mb, seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROCEDURES = ("two_stage", "end_to_end")
OVER_LIMIT = 3  # worker exit code: its RSS passed --max-rss-gb
OUT_OF_MEMORY = 4  # worker exit code: the device ran out of memory (torch.OutOfMemoryError)


def build(model_name: str, device: str, rank: int | None) -> tuple[torch.nn.Module, MALMEN]:
    """The model (random weights) and a MALMEN editor with config/editor/malmen.yaml's settings, on `device`."""
    overrides = [f"model={model_name}", "editor=malmen", f"model_device={device}"]
    overrides += [f"editor.rank={rank}"] if rank else []
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    mc = cfg.model
    if mc.tiny is not None:
        model, _ = load_model(arch=mc.arch, family=mc.family, name_or_path=None, tokenizer=None, dtype=mc.dtype,
                              tiny=OmegaConf.to_container(mc.tiny), device=device)
    elif mc.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config()).to(device).eval()  # GPT2Config() defaults = GPT-2 124M
        model.requires_grad_(False)
    else:
        raise ValueError(f"the benchmark builds GPT-2 (model=gpt2) or a tiny model; got model={model_name}")
    return model, build_editor(cfg, model)


def random_group(m: int, vocab: int, batch_size: int, prompt_len: int, answer_len: int) -> EditGroup:
    """m edits of random token ids: edit, equivalent and unrelated tuples in LM batches of batch_size."""
    def batches():
        out = []
        for i in range(0, m, batch_size):
            b = min(batch_size, m - i)
            tokens = torch.randint(0, vocab, (b, prompt_len + answer_len))
            ids = tokens[:, :-1]  # (b, T) as the Collator: the last answer token is never an input
            labels = torch.full_like(ids, -100)
            labels[:, prompt_len - 1:] = tokens[:, prompt_len:]  # position t predicts token t + 1
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        return out
    records = [EditRecord(prompt=f"<random ids {i}>", answer="<random ids>", equiv_prompts=("<random ids>",),
                          unrel_prompt="<random ids>", unrel_answer="<random ids>", index=i) for i in range(m)]
    return EditGroup(records=records, edit=batches(), equiv=batches(), unrel=batches())


def _watch_rss(limit_mb: float) -> None:
    """Exit the worker with OVER_LIMIT once its resident set passes limit_mb (keeps a shared machine alive)."""
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    while True:
        with open("/proc/self/statm") as f:
            if int(f.read().split()[1]) * page_mb > limit_mb:
                os._exit(OVER_LIMIT)
        time.sleep(0.02)


def worker(args) -> None:
    """One meta-step of one procedure at one m; prints a JSON line with the peak memory."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.max_rss_gb:
        threading.Thread(target=_watch_rss, args=(args.max_rss_gb * 1024,), daemon=True).start()
    seed_everything(0)
    device = torch.device(args.device)
    model, editor = build(args.model, args.device, args.rank)
    group = random_group(args.worker_m, model.config.vocab_size, args.batch_size, args.prompt_len, args.answer_len)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    setup_mb = peak_memory_mb(device) if device.type != "cuda" else torch.cuda.memory_allocated(device) / 2**20
    start = time.time()
    try:
        editor.meta_step(group, end_to_end=args.procedure == "end_to_end")
    except torch.OutOfMemoryError:  # the result of this run, not a failure of the benchmark
        sys.exit(OUT_OF_MEMORY)
    print(json.dumps({"m": args.worker_m, "procedure": args.procedure, "peak_mb": peak_memory_mb(device),
                      "setup_mb": setup_mb, "step_s": time.time() - start,
                      "cached_tokens": args.worker_m * args.answer_len}))


def measure(args, m: int, procedure: str) -> dict:
    """Run `worker` in a fresh interpreter; a failed or over-limit run is recorded, not raised."""
    cmd = [sys.executable, __file__, "--worker", "--worker-m", str(m), "--procedure", procedure]
    for flag in ("model", "device", "batch_size", "prompt_len", "answer_len", "rank", "threads", "max_rss_gb"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    status = {OVER_LIMIT: f"over {args.max_rss_gb:g} GiB", OUT_OF_MEMORY: "out of memory",
              -9: "out of memory (killed by the OS)"}.get(proc.returncode, f"failed (exit {proc.returncode})")
    if proc.returncode not in (OVER_LIMIT, OUT_OF_MEMORY, -9):
        print(proc.stderr[-2000:], file=sys.stderr)
    return {"m": m, "procedure": procedure, "peak_mb": None, "status": status}


def write_outputs(rows: list[dict], out: Path, title: str, device_gib: float | None = None) -> str:
    """memory.csv (one row per run), memory.md (the Fig. 9 table) and memory.png, both in GiB, with the
    device's memory as a line when known; returns the table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = ("m", "procedure", "peak_mb", "setup_mb", "step_s", "cached_tokens", "status")
    atomic_write(out / "memory.csv", "\n".join([",".join(keys)] + [
        ",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in rows]) + "\n")
    by = {(r["m"], r["procedure"]): r for r in rows}
    ms = sorted({r["m"] for r in rows})

    def cell(r):
        if r is None:
            return "–"
        return r.get("status", "–") if r["peak_mb"] is None else f"{r['peak_mb'] / 1024:.2f}"
    body = []
    for m in ms:
        a, b = by.get((m, "two_stage")), by.get((m, "end_to_end"))
        ok = a and b and a["peak_mb"] and b["peak_mb"]
        body.append([m, cell(a), cell(b), f"{b['peak_mb'] / a['peak_mb']:.2f}" if ok else "–"])
    lines = [f"**{title}**", "", *markdown_table(["m", "two-stage (GiB)", "end-to-end (GiB)", "end-to-end / two-stage"],
                                                 body, right=True)]
    table = "\n".join(lines) + "\n"
    atomic_write(out / "memory.md", table)

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for proc, name in (("two_stage", "MALMEN (two-stage)"), ("end_to_end", "MEND-style (end-to-end)")):
        pts = [(m, by[(m, proc)]["peak_mb"] / 1024) for m in ms if by.get((m, proc)) and by[(m, proc)]["peak_mb"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    if device_gib:
        ax.axhline(device_gib, color="k", ls="--", lw=1, label=f"device memory ({device_gib:.0f} GiB)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("number of edits m")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2", help="config/model name: gpt2 (random weights) or tiny-gpt2")
    p.add_argument("--m", type=int, nargs="+", default=[32, 64, 128, 256], help="numbers of edits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/fig9_memory"))
    p.add_argument("--batch-size", type=int, default=64, help="LM batch (tuples), as data/zsre.yaml")
    p.add_argument("--prompt-len", type=int, default=11)
    p.add_argument("--answer-len", type=int, default=3)
    p.add_argument("--rank", type=int, default=None, help="hyper-network rank (default: editor config, 1920)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--max-rss-gb", type=float, default=None, help="stop a worker whose RSS passes this")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-m", type=int, help=argparse.SUPPRESS)
    p.add_argument("--procedure", choices=PROCEDURES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows, skip = [], set()
    for m in tqdm(sorted(args.m), desc="memory benchmark (m)", dynamic_ncols=True):
        for procedure in PROCEDURES:
            if procedure in skip:  # it did not fit at a smaller m: it will not at this one
                rows.append({"m": m, "procedure": procedure, "peak_mb": None, "status": "not run"})
                continue
            rows.append(measure(args, m, procedure))
            if rows[-1]["peak_mb"] is None:
                skip.add(procedure)
    unit = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    title = f"Fig. 9: {unit} of one meta-step, {args.model}, {args.device}"
    device = torch.device(args.device)
    device_gib = (torch.cuda.get_device_properties(device).total_memory / 2**30
                  if device.type == "cuda" and torch.cuda.is_available() else None)
    print(write_outputs(rows, args.out, title, device_gib))
    print(f"written to {args.out}/memory.{{csv,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

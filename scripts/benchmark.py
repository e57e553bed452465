"""Per-phase times of one MALMEN (or MEND) meta-step and one validation group.

python scripts/benchmark.py --data RECORDS.json [--format zsre|counterfact] [--tokenizer DIR] [--model gpt2]
                            [--editor malmen|mend] [--m 64 256] [--device cpu] [--threads 1] [--steps 2]
                            [--prefix-cache both|on|off|store] [--out DIR]

For each m: the first m records of --data (e.g. ../shared/data/zsre/zsre_mend_train-1k.json, or a CounterFact
split's train.json with --format counterfact) make one group, tokenised by --tokenizer (needed by gpt2 and gpt-j,
e.g. ../shared/data/gpt2-tokenizer; the model's own by default) and batched as data/groups.py batches it. The
model is the real architecture with random weights (`gpt2`: GPT2Config(), GPT-2 124M; `gpt-j`: GPTJConfig(), 6B;
a model with a `tiny` config: as in the tests), or a real model that needs no hub (`smollm2`, converted once into
cache/); nothing is downloaded. The editor is config/editor/<--editor>.yaml (A.6: rank 1920, hyper-network batch
1024) on the model's edit_modules, LM batch --batch-size (64, data/zsre.yaml).

Phases, timed through the editor's phase hooks (Editor.phase, editor/malmen.py):
  meta-step   trace (keys and value gradients), hyper-network (D for S*, or MEND's U~ and G~; no gradient), solve
              (factoring and S* without the hyper-network; MEND: the sum), stage 1 forward (the edited LM's logits), stage 1 backward (the rest of
              stage 1), KL reference (the pre-edit logits of the unrelated tuples), stage 2 (pull-back through
              the hyper-network), total
  validation  pre-edit ES/GS/LS, edit (trace + solves + residual), post-edit ES/GS/LS, total
Each phase is reported as wall seconds and CPU seconds of this process (CPU time stays stable under load where
wall time does not). Peak RSS (CPU) or peak allocated memory (GPU) is the whole run's. --prefix-cache:
  off / on   without / with the prefix states, the lower blocks' outputs held per tuple (model/prefix.py); with
             on, --steps > 1 times several meta-steps on the same group and reports the last (the first fills the
             held states, as the first epoch does); both (the default) times each m both ways
  store      a first run against a later one: the first (cold) computes every tuple and fills a disk store (in a
             temporary folder); the later (warm), new prefix states with an empty memory, read it, as every cell, seed
             and editor of a grid after the first does (config prefix_store)
  cold, warm one of the two, the store in --store DIR: `--prefix-cache cold --store DIR`, then `--prefix-cache
             warm --store DIR` in another process, gives each its own peak memory
For Llama-family models the table adds a floor: the FLOPs of the LM work from the first edited block up (the
blocks' matmuls, the head at the answer positions; `flop_floor`) at this machine's measured float32 matmul rate.
Writes benchmark.md (markdown table with the machine, threads and load) and benchmark.json to --out, and prints
the table.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="zsRE records (MEND format), e.g. zsre_mend_train-1k.json")
    p.add_argument("--tokenizer", help="tokenizer folder or name, e.g. ../shared/data/gpt2-tokenizer (default: the "
                   "model's own; needed by the random-weight gpt2 and gpt-j)")
    p.add_argument("--model", default="gpt2", help="gpt2, gpt-j (random weights), a tiny model config, or a model "
                   "whose weights need no hub (smollm2)")
    p.add_argument("--m", type=int, nargs="+", default=[64], help="numbers of edits (one group each); one per "
                   "process gives each m its own peak memory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the project's default)")
    p.add_argument("--batch-size", type=int, default=64, help="LM batch (tuples), as data/zsre.yaml")
    p.add_argument("--steps", type=int, default=2, help="meta-steps timed on one group; the last is reported (with "
                   "the prefix states: the first fills them, as epoch 1 does, the last reads them, as later epochs do)")
    p.add_argument("--prefix-cache", choices=("both", "on", "off", "store", "cold", "warm"), default="both",
                   help="time without and/or with the prefix states (model/prefix.py); store: a first run's "
                   "meta-step and validation group (cold: every tuple computed, the disk store filled) against a "
                   "later run's (a new process: memory empty, the store warm); cold, warm: one of the two, with --store")
    p.add_argument("--store", type=Path, help="the disk store's folder for --prefix-cache cold or warm (run cold, then "
                   "warm in another process: each its own peak memory); store uses a temporary one")
    p.add_argument("--editor", default="malmen", choices=("malmen", "mend"), help="the editor timed")
    p.add_argument("--format", default="zsre", choices=("zsre", "counterfact"), help="--data's format")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"), help="folder for benchmark.md and .json")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: one line and exit 2 (argparse's) for a missing --data file, m < 1, or a
    random-weight model without --tokenizer (its default would be the hub's gpt2)."""
    p = arguments()
    args = p.parse_args(argv)
    if args.prefix_cache in ("cold", "warm") and args.store is None:
        p.error(f"--prefix-cache {args.prefix_cache} needs --store DIR (cold fills it, warm reads it)")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    if min(args.m) < 1 or args.steps < 1 or args.threads < 1 or args.batch_size < 1:
        p.error("--m, --steps, --threads and --batch-size must be >= 1")
    if args.model in ("gpt2", "gpt-j") and args.tokenizer is None:
        p.error(f"--model {args.model} (random weights) needs --tokenizer, e.g. ../shared/data/gpt2-tokenizer")
    return args


if __name__ == "__main__":  # --help and bad arguments answer before torch is imported (it takes seconds)
    parse()

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from data.collate import Collator  # noqa: E402
from data.groups import edit_groups  # noqa: E402
from data.records import load_records  # noqa: E402
from editor.base import apply_shifts  # noqa: E402
from model.load import load_model  # noqa: E402
from model.prefix import PrefixStates  # noqa: E402
from pipeline import experiment  # noqa: E402
from pipeline.report import markdown_table  # noqa: E402
from util import atomic_write, peak_memory_mb, seed_everything  # noqa: E402


class Timer:
    """Accumulates wall and CPU seconds per phase name."""

    def __init__(self, device: torch.device):
        self.device, self.wall, self.cpu = device, defaultdict(float), defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def context(self, phase: str):
        """Adds the time of its body to `phase` (the editor's `phase` hooks, Editor.timer)."""
        self._sync()
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._sync()
            self.wall[phase] += time.perf_counter() - w
            self.cpu[phase] += time.process_time() - c

    def phase(self, phase: str, fn, *args, **kwargs):
        self._sync()
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self._sync()
        self.wall[phase] += time.perf_counter() - w
        self.cpu[phase] += time.process_time() - c
        return out

    def reset(self):
        self.wall.clear()
        self.cpu.clear()


def build_model(name: str, tokenizer: str | None, device: str, editor: str = "malmen"):
    """Random weights of the real architecture (gpt2, gpt-j), a tiny model, or the real weights of a
    model that needs no hub (smollm2, a local name_or_path); the config and tokenizer (--tokenizer, else
    the model's own)."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}", f"editor={editor}", "data=zsre",
                                                       f"model_device={device}", f"editor_device={device}",
                                                       f"editor.cache_device={device}"])
    mc, tok = cfg.model, None
    if name not in ("gpt2", "gpt-j") and mc.tiny is None:  # real weights, converted or local
        experiment.materialize(cfg)
        model, tok = experiment.load(cfg)
    elif mc.tiny is not None:  # with its own tokenizer (a byte-level one): the tiny vocabulary is 257
        model, tok = load_model(arch=mc.arch, family=mc.family, name_or_path=None, tokenizer=None, dtype=mc.dtype,
                              tiny=OmegaConf.to_container(mc.tiny), device=device)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM
        built = {"gpt2": lambda: GPT2LMHeadModel(GPT2Config()), "gpt-j": lambda: GPTJForCausalLM(GPTJConfig())}
        dtype = getattr(torch, mc.dtype)
        with torch.device(device):
            model = built[name]().to(dtype).eval()
        model.requires_grad_(False)
    if tokenizer is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer)
        tok.pad_token = tok.pad_token or tok.eos_token
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        sys.exit(f"error: --tokenizer {tokenizer} has {len(tok)} tokens, more than model {name}'s {rows} "
                 "embeddings: leave --tokenizer out to use the model's own")
    return cfg, model, tok


META = ("trace", "hyper-network", "solve", "stage 1 forward", "stage 1 backward", "KL reference", "stage 2", "meta-step")


def meta_row(timer: Timer) -> dict:
    """The meta-step's phases (wall, CPU), from the editor's hooks: solve = factoring and S* without the
    hyper-network (MEND: the sum); stage 1 forward = the edited LM's forward (logits); stage 1 backward = the rest
    of stage 1 (the losses and their backward) less the KL reference."""
    get = lambda k: (timer.wall[k], timer.cpu[k])  # noqa: E731
    minus = lambda a, *b: tuple(a[i] - sum(x[i] for x in b) for i in (0, 1))  # noqa: E731
    row = {k: get(k) for k in ("trace", "hyper-network", "stage 2", "meta-step")}
    row["solve"] = get("solve")
    row["stage 1 forward"], row["KL reference"] = get("edited forward"), get("KL reference")
    row["stage 1 backward"] = minus(get("stage 1"), get("edited forward"), get("KL reference"))
    return {k: row[k] for k in META}


def run(args, m: int, mode: str, store_dir: Path | None = None) -> dict:
    """One meta-step and one validation group at m. mode: off (no prefix states), on (--steps steps, the last
    timed: the states in memory filled by the ones before), cold (a first run: every tuple computed, the disk
    store at `store_dir` filled) or warm (a later run: new prefix states, memory empty, the store filled by
    cold)."""
    seed_everything(0)
    device = torch.device(args.device)
    cfg, model, tok = build_model(args.model, args.tokenizer, args.device, args.editor)
    editor = experiment.build_editor(cfg, model)
    stored = mode in ("cold", "warm")  # the meta-step's store and the validation group's: filled by cold
    new_states = lambda part: PrefixStates(model, editor.edited_modules(), device, enabled=mode != "off",  # noqa: E731
                                           store_dir=store_dir / part if stored else None)
    editor.prefix = new_states("train")
    records = load_records(args.data, args.format)
    collator = Collator(tok, cfg.model.family)
    group = next(iter(edit_groups(records[:m], m, args.batch_size, collator, seed=0, shuffle=False,
                                  path=args.data)))
    timer = Timer(device)
    editor.timer = timer.context  # the editor's phase hooks (Editor.phase)
    for _ in range(args.steps if mode == "on" else 1):
        timer.reset()
        timer.phase("meta-step", editor.meta_step, group)
    row = meta_row(timer)
    timer.reset()
    family = cfg.model.family
    trained = editor.prefix.summary()
    # a validation group: records not seen before (off, on, cold: no states held, filled by the pre-edit
    # metrics) or seen by an earlier run (warm: new prefix states that read the store)
    editor.prefix = new_states("valid")
    pre = timer.phase("pre-edit metrics", experiment.evaluate, model, group, family, device, editor.prefix)[0]
    shifts = timer.phase("edit", editor.edit, group.edit)
    with apply_shifts(model, shifts, editor.label):
        post = timer.phase("post-edit metrics", experiment.evaluate, model, group, family, device, editor.prefix)[0]
    row.update({k: (timer.wall[k], timer.cpu[k]) for k in ("pre-edit metrics", "edit", "post-edit metrics")})
    row["validation group"] = tuple(sum(row[k][i] for k in ("pre-edit metrics", "edit", "post-edit metrics"))
                                    for i in (0, 1))
    tokens = {kind: sum(int(b["attention_mask"].numel()) for b in getattr(group, kind))
              for kind in ("edit", "equiv", "unrel")}  # tokens through the LM, padding included
    answers = {kind: sum(int((b["labels"] != -100).sum()) for b in getattr(group, kind))
               for kind in ("edit", "equiv", "unrel")} if family != "classifier" else None
    return {"m": m, "mode": mode, "prefix_cache": trained, "prefix_cache_validation": editor.prefix.summary(),
            "phases": row, "peak_mb": peak_memory_mb(device), "lm_tokens": tokens, "answer_positions": answers,
            "floor": flop_floor(model, editor.prefix.first, tokens, answers), "pre": pre, "post": post}


def flop_floor(model, first: int | None, tokens: dict, answers: dict | None) -> dict | None:
    """FLOPs of one meta-step's LM work from the first edited block up (Llama-family blocks; None for others):
    the blocks' matmuls (q, k, v, o; gate, up, down) per token and the output head at the answer positions;
    forward 1x, backward 1x more (the frozen weights need only input gradients) plus the edited down_proj's weight
    gradient in stage 1. Passes: the trace (edit tuples, forward and backward), stage 1 (equivalent and unrelated
    tuples, forward and backward) and the KL reference (unrelated, forward)."""
    c = model.config
    if first is None or getattr(c, "model_type", None) not in ("llama", "qwen2", "mistral") or answers is None:
        return None
    d, f, v, n = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers - first
    kv = d * c.num_key_value_heads // c.num_attention_heads
    block = 2 * (2 * d * d + 2 * d * kv) + 2 * 3 * d * f  # forward, per token
    head = 2 * d * v  # forward, per answer position
    fwd = lambda kind: n * block * tokens[kind] + head * answers[kind]  # noqa: E731
    weight_grad = n * 2 * d * f * (tokens["equiv"] + tokens["unrel"])  # the edited down_proj, stage 1 only
    total = 2 * fwd("edit") + 2 * fwd("equiv") + 3 * fwd("unrel") + weight_grad
    return {"flops": total, "blocks": n}


def matmul_gflops(device: torch.device, d: int = 576, f: int = 1536, rows: int = 2048, repeat: int = 20) -> float:
    """This machine's measured float32 matmul rate (GFLOP/s, torch's threads) at an FFN's shape."""
    a, w = torch.randn(rows, d, device=device), torch.randn(d, f, device=device)
    a @ w  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        a @ w
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * rows * d * f * repeat / (time.perf_counter() - start) / 1e9


def environment(args) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    commit += " with uncommitted changes" if dirty else ""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none"
    return (f"commit {commit}, {cpu}, GPU {gpu}, {torch.get_num_threads()} torch thread(s), load average "
            f"{os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")


def table(results: list[dict], args, env: str, gflops: float) -> str:
    phases_ = list(results[0]["phases"])
    weights = "random weights" if args.model in ("gpt2", "gpt-j") or args.model.startswith("tiny-") else "its weights"
    name = {"off": "prefix states off", "on": "prefix states on", "cold": "first run (store cold)", "warm": "later run (store warm)"}
    head = ["phase", *(h for r in results for h in (f"m = {r['m']}, {name[r['mode']]}: wall s", "CPU s"))]
    body = [[p, *(f"{v:.2f}" for r in results for v in r["phases"][p])] for p in phases_]
    body.append(["peak memory (GiB)", *(c for r in results for c in (f"{r['peak_mb'] / 1024:.2f}", ""))])
    body.append(["LM tokens edit / equiv / unrel (padding incl.)", *(c for r in results for c in (
        f"{r['lm_tokens']['edit']} / {r['lm_tokens']['equiv']} / {r['lm_tokens']['unrel']}", ""))])
    if all(r["floor"] for r in results):
        body.append([f"meta-step floor: the top blocks' and head's FLOPs at {gflops:.0f} GFLOP/s (s)",
                     *(c for r in results for c in (f"{r['floor']['flops'] / 1e9 / gflops:.2f}", ""))])
    lines = [f"**{args.editor.upper()}, model {args.model} ({weights}), device {args.device}, LM batch {args.batch_size}**",
             "", *markdown_table(head, body, right=True)]
    notes = ("prefix states on: the meta-step is the last of --steps on one group, from the lower blocks' states the "
             "steps before held. "
             "first run / later run: the first run's meta-step computes every tuple and fills the disk store; the later "
             "run's (new prefix states, memory empty) reads it, as every cell, seed and editor of a grid after the first does. "
             "The validation group starts with no states in memory (later run: the store warm). solve: factoring and "
             "S* without the hyper-network; stage 1 backward: stage 1 less the edited forward and the KL reference. "
             "The floor: the LM matmuls from the first edited block up, at the measured rate of a float32 matmul of an "
             "FFN's shape (flop_floor). Peak memory is the process's, the largest so far.")
    return "\n".join(lines) + f"\n\n{notes}\n\n{env}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    results = []
    modes = {"both": ("off", "on"), "store": ("cold", "warm")}.get(args.prefix_cache, (args.prefix_cache,))
    with tempfile.TemporaryDirectory() as scratch:  # the disk store of --prefix-cache store, removed at the end
        for m in args.m:  # one process: the peak memory of a later run is max(earlier, its own); one m per call
            for mode in modes:
                results.append(run(args, m, mode, (args.store or Path(scratch)) / f"store_m{m}"))
                print(json.dumps(results[-1]), flush=True)
    gflops = matmul_gflops(torch.device(args.device))
    env = environment(args)
    text = table(results, args, env, gflops)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "benchmark.md", text)
    atomic_write(args.out / "benchmark.json", json.dumps({"results": results, "environment": env,
                                                          "matmul_gflops": gflops}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

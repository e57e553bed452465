"""Per-phase times of one MALMEN meta-step and one validation group (issue 17).

python scripts/benchmark.py --data ZSRE.json --tokenizer DIR [--model gpt2] [--m 64 256] [--device cpu]
                            [--threads 1] [--steps 2] [--prefix-cache both|on|off] [--out DIR]

For each m: the first m records of --data (real zsRE, e.g. ../shared/data/zsre/zsre_mend_train-1k.json)
make one group, tokenised by --tokenizer (needed by gpt2 and gpt-j, e.g. ../shared/data/gpt2-tokenizer;
the model's own by default) and batched as
data/groups.py batches it. The model is the real architecture with random weights (`gpt2`: GPT2Config(),
GPT-2 124M; `gpt-j`: GPTJConfig(), 6B; a model with a `tiny` config: as in the tests), or a real model
that needs no hub (`smollm2`, converted once into cache/); nothing is downloaded. The editor is config/editor/malmen.yaml (A.6: rank 1920, hyper-network batch 1024) on the
model's edit_modules, LM batch --batch-size (64, data/zsre.yaml).

Phases, timed by wrapping the editor's own methods (so any version of the code is measured alike):
  meta-step   trace (keys and value gradients), solve (S* per layer), stage 1 (L_gen, L_loc and
              their backward through the LM), stage 2 (pull-back through the hyper-network), total
  validation  pre-edit ES/GS/LS, edit (trace + solves + residual), post-edit ES/GS/LS, total
Each phase is reported as wall seconds and CPU seconds of this process (CPU time stays stable under
load where wall time does not). Peak RSS (CPU) or peak allocated memory (GPU) is the whole run's.
--steps > 1 times several meta-steps on the same group and reports the last (the first may pay
one-time costs; with the prefix cache the first fills it, as the first epoch does, and the last reads it, as
every later epoch does). --prefix-cache both (the default) times each m without and with the cached lower
blocks (model/prefix.py, issue 26); the validation group's pre-edit metrics fill the cache there. Writes benchmark.md (markdown table with the machine, threads and load) and
benchmark.json to --out, and prints the table.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
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
                   "the prefix cache: the first fills it, as epoch 1 does, the last reads it, as later epochs do)")
    p.add_argument("--prefix-cache", choices=("both", "on", "off"), default="both",
                   help="time without and/or with the cached lower blocks (model/prefix.py)")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"), help="folder for benchmark.md and .json")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked: one line and exit 2 (argparse's) for a missing --data file, m < 1, or a
    random-weight model without --tokenizer (its default would be the hub's gpt2)."""
    p = arguments()
    args = p.parse_args(argv)
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
from model.prefix import PrefixCache  # noqa: E402
from pipeline import experiment  # noqa: E402
from util import atomic_write, peak_memory_mb, seed_everything  # noqa: E402


class Timer:
    """Accumulates wall and CPU seconds per phase name."""

    def __init__(self, device: torch.device):
        self.device, self.wall, self.cpu = device, defaultdict(float), defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, obj, method: str, phase: str):
        """Replace obj.method by a version that adds its time to `phase` (re-entrant calls count once)."""
        inner, depth = getattr(obj, method), [0]

        def timed(*args, **kwargs):
            if depth[0]:
                return inner(*args, **kwargs)
            depth[0] += 1
            self._sync()
            w, c = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self._sync()
                self.wall[phase] += time.perf_counter() - w
                self.cpu[phase] += time.process_time() - c
                depth[0] -= 1
        setattr(obj, method, timed)

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


def build_model(name: str, tokenizer: str | None, device: str):
    """Random weights of the real architecture (gpt2, gpt-j), a tiny model, or the real weights of a
    model that needs no hub (smollm2, a local name_or_path); the config and tokenizer (--tokenizer, else
    the model's own)."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}", "editor=malmen", "data=zsre",
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


def run(args, m: int, prefix: bool) -> dict:
    seed_everything(0)
    device = torch.device(args.device)
    cfg, model, tok = build_model(args.model, args.tokenizer, args.device)
    editor = experiment.build_editor(cfg, model)
    editor.prefix = PrefixCache(model, editor.edited_modules(), device, enabled=prefix)
    records = load_records(args.data, "zsre")
    collator = Collator(tok, cfg.model.family)
    group = next(iter(edit_groups(records[:m], m, args.batch_size, collator, seed=0, shuffle=False,
                                  path=args.data)))
    timer = Timer(device)
    timer.wrap(editor, "cache", "trace")
    timer.wrap(editor, "shifts", "solve")
    timer.wrap(editor, "meta_losses", "stage 1")
    timer.wrap(editor, "pull_back", "stage 2")
    for _ in range(args.steps):
        timer.reset()
        timer.phase("meta-step", editor.meta_step, group)
    row = {f"{k}": (timer.wall[k], timer.cpu[k]) for k in ("trace", "solve", "stage 1", "stage 2", "meta-step")}
    timer.reset()
    family = cfg.model.family
    trained = editor.prefix.summary()
    # a validation group of records not seen before: an empty cache, filled by the pre-edit metrics
    editor.prefix = PrefixCache(model, editor.edited_modules(), device, enabled=prefix)
    pre = timer.phase("pre-edit metrics", experiment.evaluate, model, group, family, device, editor.prefix)
    shifts, _ = timer.phase("edit", editor.edit_with_residual, group.edit)
    with apply_shifts(model, shifts, editor.label):
        post = timer.phase("post-edit metrics", experiment.evaluate, model, group, family, device, editor.prefix)
    row.update({k: (timer.wall[k], timer.cpu[k]) for k in ("pre-edit metrics", "edit", "post-edit metrics")})
    row["validation group"] = tuple(sum(row[k][i] for k in ("pre-edit metrics", "edit", "post-edit metrics"))
                                    for i in (0, 1))
    tokens = {kind: sum(int(b["attention_mask"].numel()) for b in getattr(group, kind))
              for kind in ("edit", "equiv", "unrel")}  # tokens through the LM, padding included
    return {"m": m, "prefix_cache": trained, "prefix_cache_validation": editor.prefix.summary(), "phases": row, "peak_mb": peak_memory_mb(device),
            "lm_tokens": tokens, "pre": pre, "post": post}


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


def table(results: list[dict], args, env: str) -> str:
    phases = list(results[0]["phases"])
    weights = "random weights" if args.model in ("gpt2", "gpt-j") or args.model.startswith("tiny-") else "its weights"
    lines = [f"**MALMEN, model {args.model} ({weights}), device {args.device}, LM batch {args.batch_size}**",
             "", "| phase | " + " | ".join(f"m = {r['m']}, prefix cache {r['prefix_cache']['off'] or 'on'}: "
                                          "wall s | CPU s" for r in results) + " |",
             "|---|" + "---:|---:|" * len(results)]
    for p in phases:
        lines.append(f"| {p} | " + " | ".join(f"{r['phases'][p][0]:.2f} | {r['phases'][p][1]:.2f}"
                                              for r in results) + " |")
    lines.append("| peak memory (GiB) | " + " | ".join(f"{r['peak_mb'] / 1024:.2f} | " for r in results) + " |")
    lines.append("| LM tokens edit / equiv / unrel (padding incl.) | " + " | ".join(
        f"{r['lm_tokens']['edit']} / {r['lm_tokens']['equiv']} / {r['lm_tokens']['unrel']} | " for r in results)
        + " |")
    notes = ("The meta-step is the last of --steps on one group: with the prefix cache its lower blocks were cached by the "
             "steps before, as from the second epoch on. The validation group starts from an empty cache. Peak memory is "
             "the process's: with --prefix-cache both, a column's is the largest so far (run on and off apart to compare).")
    return "\n".join(lines) + f"\n\n{notes}\n\n{env}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    results = []
    caches = {"both": (False, True), "on": (True,), "off": (False,)}[args.prefix_cache]
    for m in args.m:  # one process: the peak memory of a later run is max(earlier, its own); one m per call
        for prefix in caches:
            results.append(run(args, m, prefix))
            print(json.dumps(results[-1]), flush=True)
    env = environment(args)
    text = table(results, args, env)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "benchmark.md", text)
    atomic_write(args.out / "benchmark.json", json.dumps({"results": results, "environment": env}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

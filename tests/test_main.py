"""main.py end to end on tiny models: every model x data x editor, checkpoints, bad input."""
import json
import math

import pytest
import torch

from data.records import DataError
from pipeline.experiment import run
from tests.helpers import cli, data_files, qa_records, smoke_cfg, write_records

TINY = ["tiny-gpt2", "tiny-t5", "tiny-gptj", "tiny-bert"]


@pytest.mark.parametrize("editor", ["malmen", "mend", "ft", "memit", "emmet", "locft_bf"])
@pytest.mark.parametrize("data", ["zsre", "fever"])
@pytest.mark.parametrize("model", TINY)
def test_every_combination_runs(tmp_path, model, data, editor):
    cfg = smoke_cfg(tmp_path, model, data, editor)
    if model == "tiny-bert" and data == "zsre":
        with pytest.raises(ValueError, match="data=fever"):
            run(cfg, tmp_path)
        return
    if editor in ("memit", "emmet") and cfg.model.family != "causal":
        with pytest.raises(ValueError, match=f"editor {editor} edits causal LMs"):
            run(cfg, tmp_path)
        return
    if editor in ("memit", "emmet") and data == "fever":  # FEVER claims carry no subject to edit at
        with pytest.raises(DataError, match=r"record \d+: field 'subject': missing"):
            run(cfg, tmp_path)
        return
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final"] == results["final"]
    assert saved["config"]["model"]["name"] == model and saved["config"]["data"]["n_edits"] == 4
    for key in ("final", "pre_edit"):
        assert set(saved[key]) == {"ES", "GS", "LS", "generated"}  # data.generate is on by default
        assert set(saved[key]["generated"]) == {"ES", "GS", "LS", "unchanged"}
        assert all(0.0 <= v <= 1.0 for part in (saved[key], saved[key]["generated"])
                   for v in part.values() if not isinstance(v, dict))
        for k in ("ES", "GS", "LS"):  # an exact match of the whole answer is a success of each of its tokens
            assert saved[key]["generated"][k] <= saved[key][k] + 1e-12
    assert saved["pre_edit"]["generated"]["unchanged"] == 1.0  # before the edit nothing has changed
    assert len(saved["valid"]) == 1 and set(saved["valid"][0]["generated"]) == {"ES", "GS", "LS", "unchanged"}
    assert len(saved["generate_time_s"]) == 1 and saved["generate_time_s"][0] > 0
    assert saved["time_s"] > 0 and 0 < saved["cpu_time_s"] and saved["peak_memory_mb"] > 0
    assert (saved["stats_time_s"] > 0) == (editor in ("memit", "emmet"))  # a fresh cache_dir: computed
    if editor not in ("malmen", "mend"):
        assert saved["train"] == [] and not (tmp_path / "checkpoint.pt").exists()
    else:
        assert len(saved["train"]) == 1
        assert math.isfinite(saved["train"][0]["gen_loss"]) and math.isfinite(saved["train"][0]["loc_loss"])
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert set(ckpt) == {"net", "opt", "step", "config", "train_log", "rng", "trained", "input_version", "calibrated"}
        assert ckpt["step"] == 1 and ckpt["trained"] == saved["trained"]
        assert saved["trained"] == {"m": saved["config"]["data"]["n_edits"], "token": saved["config"]["editor"]["token"],
                                    "loss_reduction": saved["config"]["editor"]["loss_reduction"]}


def test_checkpoint_reloads_the_trained_editor(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    results = run(smoke_cfg(first, "tiny-gpt2", "zsre", "malmen", "max_train_steps=2"), first)
    again = run(smoke_cfg(second, "tiny-gpt2", "zsre", "malmen", "n_epochs=0",
                          f"editor.checkpoint={first / 'checkpoint.pt'}"), second)
    assert again["train"] == []
    assert again["valid"] == results["valid"]  # same hyper-network, same edits, same numbers


def test_cli_writes_results(tmp_path):
    code, err = cli(tmp_path, "model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32",
                    *data_files(tmp_path, "zsre"), "data.n_edits=4", "max_train_steps=1")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["valid"]) == 1  # 6 validation records -> one full group of 4


@pytest.mark.parametrize("bad,field", [
    ({"src": "q?", "rephrase": "q2?", "loc": "l?", "loc_ans": "x"}, "ans"),  # missing answer
    ({"src": "q?", "rephrase": "q2?", "ans": "  ", "loc": "l?", "loc_ans": "x"}, "ans"),  # empty answer
    ({"src": "q?", "ans": "a", "loc": "l?", "loc_ans": "x"}, "rephrase"),  # missing field
])
def test_bad_record_stops_with_one_message(tmp_path, bad, field):
    rows = json.loads(open(write_records(tmp_path / "v.json", qa_records(5), "zsre")).read())
    rows.insert(3, bad)
    (tmp_path / "v.json").write_text(json.dumps(rows))
    code, err = cli(tmp_path, "model=tiny-gpt2", "data=zsre", "editor=ft", "data.n_edits=2",
                    f"data.valid_path={tmp_path / 'v.json'}")
    assert code == 2
    assert "Traceback" not in err
    assert "v.json" in err and "record 3" in err and repr(field) in err, err


def test_too_few_records_and_unknown_module(tmp_path):
    args = data_files(tmp_path, "zsre", n_valid=3)
    code, err = cli(tmp_path, "model=tiny-gpt2", "editor=ft", "data.n_edits=4", *args)
    assert code == 2 and "valid.json" in err and "fewer than data.n_edits=4" in err, err
    code, err = cli(tmp_path, "model=tiny-gpt2", "editor=malmen", "data.n_edits=2", *args,
                    "model.edit_modules=[transformer.h.9.mlp.c_proj]")
    assert code == 2 and "transformer.h.9.mlp.c_proj" in err and "transformer.h.{0-3}.mlp.c_proj" in err, err


def test_record_too_long_for_the_model_is_named(tmp_path):
    records = qa_records(4)
    rows = json.loads(open(write_records(tmp_path / "v.json", records, "zsre")).read())
    rows[2]["ans"] = "x" * 600  # beyond tiny-gpt2's 512 positions: refused, never truncated
    (tmp_path / "v.json").write_text(json.dumps(rows))
    code, err = cli(tmp_path, "model=tiny-gpt2", "data=zsre", "editor=ft", "data.n_edits=4",
                    f"data.valid_path={tmp_path / 'v.json'}")
    assert code == 2 and "v.json: record 2: field 'edit tuple'" in err and "longer than" in err, err


def test_wandb_offline_logging(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(smoke_cfg(tmp_path, "tiny-gpt2", "zsre", "malmen", "logger=wandb", "wandb.mode=offline"), tmp_path)
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0

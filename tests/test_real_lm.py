"""The real-LM pipeline (scripts/real_lm.sh, experiment=real_lm_zsre) at tiny size: the disjoint recorded
split of real zsRE records, every editor's results.json, and the aggregate table with "Before editing"."""
import hashlib
import json
import subprocess

import pytest

from scripts.split_records import main as split_main
from tests.helpers import ROOT, make_cfg, qa_records, script_env, write_records

ZSRE = "zsre/zsre_mend_train-1k.json"  # the first 1,000 records of the MEND zsRE training file
EDITORS = ("ft", "memit", "emmet", "locft_bf", "malmen", "mend")
ROWS = ["Before editing", "EMMET", "FT", "LocFT-BF", "MEMIT", "MEND", "MALMEN"]  # aggregate.row_order


def test_split_is_disjoint_recorded_and_readable(tmp_path):
    src = write_records(tmp_path / "src.json", qa_records(10), "zsre")
    for seed in (None, 3):
        out = tmp_path / f"split_{seed}"
        assert split_main([src, str(out), "--n-train", "6", "--n-valid", "3"]
                          + ([] if seed is None else ["--seed", str(seed)])) == 0
        summary = json.loads((out / "split.json").read_text())
        train, valid = summary["indices"]["train"], summary["indices"]["valid"]
        assert (len(train), len(valid)) == (6, 3) and not set(train) & set(valid)
        assert summary["counts"] == {"train": 6, "valid": 3} and summary["seed"] == seed
        assert summary["source_sha256"] == hashlib.sha256(open(src, "rb").read()).hexdigest()
        assert summary["source"] == str((tmp_path / "src.json").resolve()) and summary["source_records"] == 10
        if seed is None:  # file order: the first 6, then the next 3
            assert (train, valid) == (list(range(6)), list(range(6, 9)))
        rows = json.loads(open(src).read())
        for part, idx in (("train", train), ("valid", valid)):  # the source's objects, unchanged
            assert json.loads((out / f"{part}.json").read_text()) == [rows[i] for i in idx]


def test_split_refuses_a_source_with_too_few_records_or_a_shared_prompt(tmp_path, capsys):
    src = write_records(tmp_path / "src.json", qa_records(8), "zsre")
    assert split_main([src, str(tmp_path / "out"), "--n-train", "6", "--n-valid", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}: has 8 records, the split asks for 9") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    twice = write_records(tmp_path / "twice.json", qa_records(3) + qa_records(1), "zsre")  # record 3 repeats 0
    assert split_main([twice, str(tmp_path / "out"), "--n-train", "3", "--n-valid", "1"]) == 2
    assert "record 3: field 'src'" in capsys.readouterr().err


def test_experiment_reads_the_split_and_meta_trains_for_a_bounded_budget():
    cfg = make_cfg("experiment=real_lm_zsre", "split_dir=/x")
    assert (cfg.model.name, cfg.data.name, cfg.paper_result) == ("smollm2", "zsre", "real_lm_zsre")
    assert (cfg.data.train_path, cfg.data.valid_path) == ("/x/train.json", "/x/valid.json")
    assert cfg.max_train_steps == 100 and cfg.model.memit.stats_source == "train"  # offline


def test_real_lm_script_end_to_end_on_tiny_llama(shared_data, tmp_path):
    if not (shared_data / ZSRE).is_file():
        pytest.skip(f"{shared_data / ZSRE} is not present (real zsRE records)")
    out, readme = tmp_path / "run", tmp_path / "README.md"
    readme.write_text("# t\n<!-- table:real_lm -->\n<!-- /table:real_lm -->\nafter\n")
    env = script_env(MODEL="tiny-llama", DATA=str(shared_data / ZSRE), N_TRAIN="12", N_VALID="8", M="1 2",
                     STEPS="2", VALID_STEPS="1", OUT=str(out), README=str(readme), RESULTS=str(tmp_path / "data"))
    proc = subprocess.run(["bash", "scripts/real_lm.sh", f"cache_dir={tmp_path / 'cache'}", "data.batch_size=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = json.loads((out / "split" / "split.json").read_text())
    assert split["indices"] == {"train": list(range(12)), "valid": list(range(12, 20))}
    assert split["source"] == str((shared_data / ZSRE).resolve())
    for editor in EDITORS:
        for m in (1, 2):
            path = out / "results" / f"tiny-llama_zsre_{editor}_none_m{m}_s0" / "results.json"
            res = json.loads(path.read_text())
            assert res["config"]["data"]["valid_path"] == str(out / "split" / "valid.json") and "pre_edit" in res
            if editor in ("malmen", "mend"):  # one hyper-network per m: trained for STEPS meta-steps at this m
                assert len(res["train"]) == 2 and res["config"]["editor"]["checkpoint"] is None
                assert res["trained"]["m"] == m and res["config"]["data"]["train_path"] == str(out / "split" / "train.json")
    table = (out / "results" / "real_lm_zsre.md").read_text().splitlines()
    assert [ln.split(" | ")[0].strip("| ") for ln in table if ln.startswith("| ")][1:] == ROWS  # after the header
    assert "zsre, m = 1: tiny-llama ES (%) ↑" in table[2] and "zsre, m = 2: tiny-llama ES (%) ↑" in table[2]
    assert (out / "results" / "real_lm_zsre.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results" / "summary.csv").is_file() and (tmp_path / "data" / "real_lm" / "summary.csv").is_file()
    text = readme.read_text()  # the table between the markers, a before-editing row per m, a link to its data
    assert text.count("| before editing |") == 2 and "| 2 | MALMEN | 1 |" in text and "(data/real_lm/)" in text
    assert text.startswith("# t\n<!-- table:real_lm -->\n") and text.endswith("<!-- /table:real_lm -->\nafter\n")

"""A newcomer's first hour (issue 18): results.md beside results.json, a warning when an edit did not
raise ES, CSVs with a byte-order mark, no litter behind a refused or early-interrupted run, no resume
hint without a checkpoint, shareable file modes, an absolute facts path, edit runs' own folder names, and
one message for a hub model that cannot be fetched."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.facts import read_facts
from main import run, run_edit
from report import no_gain_warning
from tests.conftest import ROOT, make_cfg, qa_records, write_records
from tests.test_checkpoint import train_cfg
from tests.test_edit import FACTS, edit_cfg, ft
from tests.test_facts import FACTS as CSV_FACTS, write
from tests.test_main import cli

FT_NOOP = ["editor=ft", "editor.lr=0", "editor.n_epochs=1"]  # AdamW with lr 0: every shift is zero
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def md_rows(text: str) -> dict[str, list[str]]:
    """The ES/GS/LS cells of results.md's table, by row name."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows if cells[0].strip()}


def cells(metrics: dict, keys=("ES", "GS", "LS")) -> list[str]:
    """How results.md writes metrics: three decimals, '-' for one that does not apply."""
    return ["-" if metrics.get(k) is None else f"{metrics[k]:.3f}" for k in keys]


def test_no_gain_warning_only_when_es_did_not_rise():
    assert "did not raise ES (before 0.250, after 0.250)" in no_gain_warning({"ES": 0.25}, {"ES": 0.25}, "memit")
    assert "editor emmet did not raise ES" in no_gain_warning({"ES": 0.5}, {"ES": 0.1}, "emmet")
    assert no_gain_warning({"ES": 1.0}, {"ES": 1.0}, "ft") is None  # nothing left to raise
    assert no_gain_warning({"ES": 0.25}, {"ES": 0.26}, "malmen") is None
    assert no_gain_warning({"ES": None}, {"ES": 0.0}, "ft") is None


def test_training_run_writes_results_md_with_the_numbers_of_results_json(tmp_path):
    results = run(train_cfg(tmp_path, "max_train_steps=1"), tmp_path)
    md = (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert md_rows(md) == {"before editing": cells(saved["pre_edit"]), "after editing": cells(saved["final"])}
    assert saved["final"] == results["final"]
    assert all(f"- **{k}**:" in md for k in ("ES", "GS", "LS"))  # one line per metric
    assert f"Editor checkpoint: `{tmp_path / 'checkpoint.pt'}`" in md and "peak memory" in md
    assert ("did not raise ES" in md) == (saved["final"]["ES"] <= saved["pre_edit"]["ES"])


def test_training_run_whose_edits_do_nothing_says_so_in_results_md(tmp_path):
    train = write_records(tmp_path / "train.json", qa_records(4), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(4, start=100), "zsre")
    results = run(make_cfg("model=tiny-gpt2", "data=zsre", *FT_NOOP, f"data.train_path={train}",
                           f"data.valid_path={valid}", "data.n_edits=4"), tmp_path)
    assert results["final"] == results["pre_edit"]
    md = (tmp_path / "results.md").read_text()
    assert "warning: editor ft did not raise ES" in md and "No editor checkpoint" in md


def test_cli_edit_that_does_nothing_warns_and_writes_results_md(tmp_path):
    (tmp_path / "facts.json").write_text(json.dumps(FACTS))
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", *FT_NOOP,
                    f"edit.facts={tmp_path / 'facts.json'}")
    assert code == 0, err
    provenance = json.loads((tmp_path / "run" / "edited" / "provenance.json").read_text())
    assert provenance["after"] == provenance["before"]
    es = provenance["before"]["ES"]
    assert f"warning: editor ft did not raise ES (before {es:.3f}, after {es:.3f})" in err
    md = (tmp_path / "run" / "results.md").read_text()
    rows = {"before editing": cells(provenance["before"]), "after editing": cells(provenance["after"])}
    assert md_rows(md) == rows  # LS '-': a facts file has no unrelated prompts
    assert "did not raise ES" in md


def test_cli_edit_run_has_its_own_folder_name_and_no_warning_when_es_rises(tmp_path):
    """Launched as a user would, from their own directory, with Hydra's default run directory."""
    (tmp_path / "facts.json").write_text(json.dumps(FACTS))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "mode=edit", "model=tiny-gpt2", "data=zsre",
                           *ft("tiny-gpt2"), "edit.facts=facts.json"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1 and run_dirs[0].name.endswith("_edit_tiny-gpt2_zsre_ft"), run_dirs
    provenance = json.loads((run_dirs[0] / "edited" / "provenance.json").read_text())
    assert provenance["after"]["ES"] > provenance["before"]["ES"]
    assert md_rows((run_dirs[0] / "results.md").read_text())["after editing"] == cells(provenance["after"])
    assert "did not raise ES" not in proc.stderr


def test_edited_model_is_shareable_and_names_its_facts_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("facts.json").write_text(json.dumps(FACTS))
    old = os.umask(0o022)
    try:
        run_edit(edit_cfg(tmp_path, "tiny-gpt2", "facts.json", *FT_NOOP), tmp_path)  # a relative path
    finally:
        os.umask(old)
    out = tmp_path / "edited"
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700; files not safetensors' 0600
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"provenance.json", "model.safetensors", "config.json"} <= {p.name for p in files}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}
    assert json.loads((out / "provenance.json").read_text())["facts"]["path"] == str(tmp_path / "facts.json")


def test_csv_with_a_byte_order_mark_gives_the_same_facts(tmp_path):
    plain = write(tmp_path / "plain.csv", CSV_FACTS, "csv")
    bom = tmp_path / "bom.csv"  # what a spreadsheet's "CSV UTF-8" writes
    bom.write_bytes("\ufeff".encode() + Path(plain).read_bytes())
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_facts(str(bom)) == read_facts(plain)


def test_refused_cli_run_leaves_no_run_directory(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(FACTS[0]) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", *FT_NOOP,
                    f"edit.facts={tmp_path / 'bad.jsonl'}")
    assert code == 2 and "field 'answer': missing" in err, err
    assert not (tmp_path / "run").exists()  # no folder holding only .hydra/ and an empty log


def test_ctrl_c_before_the_first_checkpoint_offers_no_resume(tmp_path):
    """SIGINT once meta-training has started, long before its first checkpoint (step 100000)."""
    cfg = train_cfg(tmp_path)
    run_dir = tmp_path / "run"
    args = [sys.executable, "main.py", "model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32",
            f"data.train_path={cfg.data.train_path}", f"data.valid_path={cfg.data.valid_path}", "data.n_edits=4",
            "data.batch_size=3", "n_epochs=100000", "save_every=100000", "save_every_minutes=1000",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.time() + 180
    while b"meta-train" not in seen and time.time() < deadline:  # tqdm's bar: run() is under way
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:  # the process ended
            break
        seen += chunk
    assert b"meta-train" in seen, seen.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err
    assert "interrupted before the first checkpoint: nothing to resume" in err, err
    assert "editor.resume" not in err and "Traceback" not in err
    assert not run_dir.exists()  # nothing in it but .hydra/ and an empty log: removed


def test_hub_model_that_cannot_be_fetched_is_one_message(tmp_path):
    """No network (HF_HUB_OFFLINE: nothing is downloaded) and an empty hub cache: one line, and the fix."""
    (tmp_path / "facts.json").write_text(json.dumps(FACTS))
    proc = subprocess.run([sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'run'}", "mode=edit", "model=gpt2",
                           "data=zsre", "editor=ft", f"edit.facts={tmp_path / 'facts.json'}"], cwd=ROOT,
                          env={**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.name_or_path=openai-community/gpt2: not a local "
                                                   "folder, and the Hugging Face hub cannot provide it"), lines
    assert lines[0].endswith("pass model.name_or_path=/path/to/folder")


"""What a run leaves behind and what it tells its user: results.md beside results.json, a warning when an
edit did not raise ES, CSVs with a byte-order mark, no litter behind a refused or early-interrupted run, no
resume hint without a checkpoint, shareable file modes, an absolute facts path, edit runs' own folder names,
one message for a hub model that cannot be fetched (in seconds, without the hub), --from-dir that leaves the
user's folder alone, and missing data files that say how to get them."""
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from data.facts import read_facts
from data.records import DataError, load_records
from editor.base import NonFiniteEdit
from model.load import hub_unreachable
from pipeline.experiment import run, run_edit
from pipeline.report import no_gain_warning
from scripts import download_data
from tests.helpers import (MAYOR_FACTS, MIXED_FACTS, ROOT, build_model, cli, edit_cfg, ft, make_cfg, qa_records,
                           release_dir, smoke_cfg, train_cfg, write_facts, write_records)

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
    teacher_forced, _, generated = md.partition("By greedy generation")  # two tables: teacher-forced, generated
    assert md_rows(teacher_forced) == {"before editing": cells(saved["pre_edit"]), "after editing": cells(saved["final"])}
    gen = ("ES", "GS", "LS", "unchanged")
    assert md_rows(generated) == {"before editing": cells(saved["pre_edit"]["generated"], gen),
                                  "after editing": cells(saved["final"]["generated"], gen)}
    assert saved["final"] == results["final"]
    assert all(f"- **{k}**:" in md for k in ("ES", "GS", "LS"))  # one line per metric
    # LS as computed: the unrelated tuples' own answers (model/lm.py accuracy), not agreement with the model before
    assert "- **LS**: locality success: the same for an unrelated prompt and its own answer in the data" in md
    assert "teacher-forced token accuracy" in md and "answer to an unrelated prompt is unchanged" not in md
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
    (tmp_path / "facts.json").write_text(json.dumps(MAYOR_FACTS))
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
    (tmp_path / "facts.json").write_text(json.dumps(MAYOR_FACTS))
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
    Path("facts.json").write_text(json.dumps(MAYOR_FACTS))
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
    plain = write_facts(tmp_path / "plain.csv", MIXED_FACTS, "csv")
    bom = tmp_path / "bom.csv"  # what a spreadsheet's "CSV UTF-8" writes
    bom.write_bytes("\ufeff".encode() + Path(plain).read_bytes())
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_facts(str(bom)) == read_facts(plain)


def test_refused_cli_run_leaves_no_run_directory(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(MAYOR_FACTS[0]) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    code, err = cli(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", *FT_NOOP,
                    f"edit.facts={tmp_path / 'bad.jsonl'}")
    assert code == 2 and "field 'answer': missing" in err, err
    assert not (tmp_path / "run").exists()  # no folder holding only .hydra/ and an empty log


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_one_line_before_any_pretraining(tmp_path):
    code, err = cli(tmp_path, "experiment=toy", "model_device=cuda", f"cache_dir={tmp_path / 'cache'}")
    assert code == 2 and err.count("\n") == 1 and "model_device=cuda, but torch sees no CUDA GPU here" in err, err
    assert not (tmp_path / "cache").exists()  # the toy LM was not pretrained first
    assert not (tmp_path / "run").exists()


def test_ctrl_c_before_the_first_checkpoint_offers_no_resume(tmp_path):
    """SIGINT once meta-training has started, long before its first checkpoint (step 100000)."""
    cfg = train_cfg(tmp_path)
    run_dir = tmp_path / "run"
    args = [sys.executable, "main.py", "model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32",
            f"data.train_path={cfg.data.train_path}", f"data.valid_path={cfg.data.valid_path}", "data.n_edits=4",
            "data.batch_size=3", "n_epochs=100000", "save_every=100000", "save_every_minutes=1000",
            f"hydra.run.dir={run_dir}"]
    # SIGINT at its default in the child, whatever this process inherited: a test run started in the
    # background (`nohup ... &`) ignores SIGINT, children inherit that, and Python then never raises
    # KeyboardInterrupt
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.time() + 180
    while b"gen=" not in seen and time.time() < deadline:  # the bar's postfix after the first meta-step
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:  # the process ended
            break
        seen += chunk
    assert b"gen=" in seen, seen.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err
    assert "interrupted before the first checkpoint: nothing to resume" in err, err
    assert "editor.resume" not in err and "Traceback" not in err
    assert not run_dir.exists()  # nothing in it but .hydra/ and an empty log: removed


def test_hub_model_that_cannot_be_fetched_is_one_message(tmp_path):
    """No network (HF_HUB_OFFLINE: nothing is downloaded) and an empty hub cache: one line, and the fix."""
    (tmp_path / "facts.json").write_text(json.dumps(MAYOR_FACTS))
    proc = subprocess.run([sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'run'}", "mode=edit", "model=gpt2",
                           "data=zsre", "editor=ft", f"edit.facts={tmp_path / 'facts.json'}"], cwd=ROOT,
                          env={**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.name_or_path=openai-community/gpt2: not a local "
                                                   "folder, and the Hugging Face hub cannot provide it"), lines
    assert lines[0].endswith("pass model.name_or_path=/path/to/folder")


def _hub_answers() -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers here; the test below needs it not to."""
    return hub_unreachable(constants.ENDPOINT) is None


def test_hub_model_is_refused_in_seconds_when_the_hub_cannot_be_reached(tmp_path):
    """HF_HUB_OFFLINE unset, empty cache, no network: huggingface_hub alone retries for 54 s; the cache is
    tried first and the hub probed once (at most HUB_PROBE_TIMEOUT s), so the one message comes at once."""
    if _hub_answers():
        pytest.skip("the Hugging Face hub is reachable from this machine; this test needs it not to be")
    (tmp_path / "facts.json").write_text(json.dumps(MAYOR_FACTS))
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    start = time.time()
    proc = subprocess.run([sys.executable, "main.py", f"hydra.run.dir={tmp_path / 'run'}", "mode=edit", "model=gpt2",
                           "data=zsre", "editor=ft", f"edit.facts={tmp_path / 'facts.json'}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    took = time.time() - start
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.name_or_path=openai-community/gpt2: not a local "
                                                   "folder, and the Hugging Face hub cannot provide it"), lines
    assert "cannot be reached" in lines[0] and lines[0].endswith("pass model.name_or_path=/path/to/folder")
    assert took < 40, f"refused after {took:.0f} s"  # the retries alone took 54 s; the imports take ~10 s here
    # the load itself, without the imports: the probe's few seconds at most
    code = ("import time; from model.load import HUB_PROBE_TIMEOUT, load_model; start = time.time()\n"
            "try: load_model('gpt2', 'causal', 'openai-community/gpt2', None, 'float32')\n"
            "except ValueError: print(time.time() - start, HUB_PROBE_TIMEOUT)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took, limit = map(float, proc.stdout.split())
    assert took < limit + 2, f"the load was refused after {took:.1f} s"


def test_hub_model_in_the_cache_loads_without_the_hub(tmp_path):
    """A hub name already in the hub cache loads from it (HF_HUB_OFFLINE unset), whether or not the hub answers."""
    model, tok = build_model(make_cfg("model=tiny-gpt2"))
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-gpt2"
    commit = "0" * 40
    model.save_pretrained(repo / "snapshots" / commit)
    tok.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("from model.load import load_model; m, _ = load_model('gpt2', 'causal', 'someone/tiny-gpt2', None, "
            "'float32'); print(sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == sum(p.numel() for p in model.parameters())


def test_download_script_from_dir_leaves_the_users_folder_alone(shared_data, tmp_path, capsys):
    """--from-dir only reads DIR: the checksums go to OUT/raw/SHA256SUMS, and are verified from there."""
    release, out = tmp_path / "release", tmp_path / "datasets"
    release_dir(shared_data, release)
    before = {f.name: f.read_bytes() for f in release.iterdir()}
    argv = ["zsre", "--from-dir", str(release), "--out", str(out)]
    assert download_data.main(argv) == 0
    assert {f.name: f.read_bytes() for f in release.iterdir()} == before  # nothing added, nothing changed
    manifest = (out / "raw" / "SHA256SUMS").read_text().splitlines()
    assert [line.split()[1] for line in manifest] == ["zsre_mend_eval.json", "zsre_mend_train.json"]
    assert "warning" not in capsys.readouterr().err
    with open(release / "zsre_mend_eval.json", "a") as fh:  # a changed release file: refused
        fh.write(" ")
    assert download_data.main(argv) == 2
    assert f"checksum mismatch against {out / 'raw' / 'SHA256SUMS'}" in capsys.readouterr().err


def test_missing_data_files_say_how_to_get_them(tmp_path, monkeypatch):
    """data=zsre before the download: one line naming the file and the command that fetches it."""
    code, err = cli(tmp_path, "model=tiny-gpt2", "data=zsre", f"data_dir={tmp_path / 'datasets'}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == (f"error: {tmp_path / 'datasets' / 'zsre' / 'zsre_mend_train.json'}: cannot read file: "
                        "missing; `python scripts/download_data.py` downloads the paper's zsRE and FEVER splits")
    monkeypatch.chdir(tmp_path)  # a relative path (data_dir is relative to the launch directory): where it looked
    with pytest.raises(DataError, match=f"cannot read file: missing \\(looked for {tmp_path / 'fever' / 'x.json'}\\); "
                                        "`python scripts/download_data.py`"):
        load_records("fever/x.json", "fever")


def test_wikitext_statistics_are_refused_in_seconds_when_the_hub_cannot_be_reached(tmp_path):
    """MEMIT's key statistics from wikitext-103 with an empty datasets cache and no network: `datasets` alone
    retries for about 30 s; the hub is probed once first, so the refusal comes within the probe's timeout."""
    if _hub_answers():
        pytest.skip("the Hugging Face hub is reachable from this machine; this test needs it not to be")
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    code = ("import time; from editor.stats import wikitext_texts; from model.load import HUB_PROBE_TIMEOUT\n"
            "start = time.time()\n"
            "try: wikitext_texts()\n"
            "except ValueError as err: print(time.time() - start, HUB_PROBE_TIMEOUT); print(err)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took, limit = map(float, proc.stdout.splitlines()[0].split())
    assert took < limit + 2, f"refused after {took:.1f} s"
    assert "cannot be reached" in proc.stdout and "the datasets cache has no copy" in proc.stdout, proc.stdout


def test_hub_probe_gives_up_in_seconds():
    """The probe before a download: a hub that never replies, refuses, or answers 5xx (what huggingface_hub
    retries for a minute) is unreachable within its timeout; any other status is an answer."""
    class Reply(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(503 if self.path.startswith("/down") else 404)
            self.end_headers()

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (backlog), never replies
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert hub_unreachable(url, timeout=2.0) is None  # 404 at the root: the host answers
        assert hub_unreachable(url + "/down", timeout=2.0) == "it answers HTTP 503"
        assert "refused" in hub_unreachable(f"http://127.0.0.1:{closed_port}", timeout=2.0).lower()
        start = time.time()
        assert hub_unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        assert time.time() - start < 3
    finally:
        server.shutdown()
        silent.close()


def test_sum_ablation_is_named_as_the_user_asked_in_messages(tmp_path):
    """editor=malmen ablation=sum runs MEND's code (editor.name 'mend' stays for it); its messages say what ran."""
    with pytest.raises(NonFiniteEdit, match=r"^editor malmen \(ablation=sum\): the edited parameter "):
        run(smoke_cfg(tmp_path, "tiny-gpt2", "zsre", "malmen", "ablation=sum", "model.dtype=float16",
                      "editor.lr_init=1e6"), tmp_path)
    (tmp_path / "mend").mkdir()
    with pytest.raises(NonFiniteEdit, match=r"^editor mend: the edited parameter "):  # editor=mend: its own name
        run(smoke_cfg(tmp_path / "mend", "tiny-gpt2", "zsre", "mend", "model.dtype=float16", "editor.lr_init=1e6"),
            tmp_path / "mend")

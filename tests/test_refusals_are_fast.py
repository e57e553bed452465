"""Errors in seconds (docs/bad_input.md): --help and refused inputs never import torch, a typo in an
override is one line with the closest name, a refused run leaves no folder (warnings or not), the toy model
refuses unknown words before its pretraining, and max_valid_steps=0 means meta-training without validation."""
import json
import math
import os
import subprocess
import sys

import pytest

from pipeline.cli import override_problem
from pipeline.experiment import run
from pipeline.preflight import check_config
from pipeline.report import results_markdown, terminal_summary
from tests.helpers import MAYOR_FACTS, ROOT, TINY_WORLD, make_cfg, qa_records, train_cfg, write_records

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HEAVY = ("torch", "transformers")


def main_py(tmp_path, *args: str, cwd=ROOT) -> tuple[int, list[str], set[str], str]:
    """`python -X importtime main.py ARGS`: (exit code, stderr lines that are not import times, the top-level
    modules imported, stdout)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "main.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    modules = {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in lines if ln.startswith("import time:")}
    return proc.returncode, [ln for ln in lines if ln.strip() and not ln.startswith("import time:")], modules, \
        proc.stdout


def test_help_does_not_import_torch(tmp_path):
    code, err, modules, out = main_py(tmp_path, "--help")
    assert code == 0 and "Powered by Hydra" in out and "editor: " in out, err
    assert out.startswith("main.py: MALMEN (Tan, Zhang and Fu, ICLR 2024)"), out[:200]  # what this program is
    assert "hydra" in modules and not modules & set(HEAVY), modules & set(HEAVY)


def test_benchmark_help_and_bad_arguments_do_not_import_torch():
    for args, code in ((["--help"], 0), (["--m", "64"], 2)):  # --data is required
        proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "scripts" / "benchmark.py"), *args],
                              env=ENV, capture_output=True, text=True, timeout=300)
        imported = {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in proc.stderr.splitlines()
                    if ln.startswith("import time:")}
        assert proc.returncode == code and not imported & set(HEAVY), (args, proc.stderr[-500:])
        assert "--data" in proc.stdout + proc.stderr


def test_bad_facts_are_refused_before_torch_and_leave_no_folder(tmp_path):
    """Hydra's default run directory, launched from the user's folder: the refusal removes it."""
    (tmp_path / "bad.json").write_text(json.dumps([MAYOR_FACTS[0], {"prompt": "p"}]))
    code, err, modules, _ = main_py(tmp_path, "mode=edit", "editor=ft", "edit.facts=bad.json", cwd=tmp_path)
    assert code == 2 and err == ["error: bad.json: record 1: field 'answer': missing"], err
    assert not modules & set(HEAVY)
    assert list(tmp_path.glob("outputs/*/*")) == []  # no outputs/<date>/<time>_* folder


def test_memit_subject_outside_its_prompt_is_refused_before_torch(tmp_path):
    """MEMIT/EMMET locate the subject in the prompt: a typo costs one second, not the model and its statistics."""
    facts = [{"prompt": "The capital of Freedonia is", "answer": "Fredville", "subject": "Freedonia"},
             {"prompt": "Acme was founded in", "answer": "1901", "subject": "Acme Corp"}]
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    code, err, modules, _ = main_py(tmp_path, "mode=edit", "model=tiny-gpt2", "editor=memit",
                                    f"edit.facts={tmp_path / 'facts.json'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err == [f"error: {tmp_path / 'facts.json'}: record 1: field 'subject': 'Acme Corp' does not "
                                 "occur in the prompt 'Acme was founded in', so memit cannot find its last token"], err
    assert not modules & set(HEAVY) and not (tmp_path / "run").exists()


def test_memit_statistics_file_missing_says_why_it_is_read(tmp_path):
    facts = [{"prompt": "The capital of Freedonia is", "answer": "Fredville", "subject": "Freedonia"}]
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    train = tmp_path / "datasets" / "zsre" / "zsre_mend_train.json"
    code, err, modules, _ = main_py(tmp_path, "mode=edit", "model=tiny-gpt2", "data=zsre", "editor=emmet",
                                    f"data_dir={train.parents[1]}",
                                    f"edit.facts={tmp_path / 'facts.json'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err == [f"error: {train}: cannot read file: missing (data.train_path: editor emmet reads its "
                                 "records' prompts and NQ questions for the key statistics C (editor.stats_source="
                                 "train); data.train_path=FILE names any file of such records); `python "
                                 "scripts/download_data.py` downloads the paper's zsRE and FEVER splits"], err
    assert not modules & set(HEAVY) and not (tmp_path / "run").exists()


def test_refusal_after_warnings_leaves_no_folder(tmp_path):
    """The log then holds the warnings, which the terminal showed too: the folder goes all the same."""
    facts = [{**MAYOR_FACTS[0], "rephrase": ["typo of rephrases"]}, {"prompt": "p"}]  # a warning, then a refusal
    (tmp_path / "bad.json").write_text(json.dumps(facts))
    code, err, _, out = main_py(tmp_path, "mode=edit", "editor=ft", f"edit.facts={tmp_path / 'bad.json'}",
                                f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err[-1] == f"error: {tmp_path / 'bad.json'}: record 1: field 'answer': missing", err
    assert "ignoring unknown fields ['rephrase']" in out + "\n".join(err)  # shown on the terminal
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,line", [
    (["edtor=malmen"], "error: edtor=malmen: the config has no key 'edtor'; did you mean editor?"),
    (["data.n_edit=5"], "error: data.n_edit=5: the config has no key 'data.n_edit'; did you mean data.n_edits?"),
    (["-m", "editor=malmen,memt"], "error: editor=memt: config group 'editor' has no option 'memt'; did you mean "
                                   "editor=memit? (options: emmet, ft, locft_bf, malmen, memit, mend)"),
])
def test_override_typo_is_one_line_naming_the_closest_key(tmp_path, args, line):
    code, err, modules, _ = main_py(tmp_path, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err == [line], err
    assert not modules & set(HEAVY) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,line", [
    (["editor=memit", "editor.n_steps=0"], "error: editor.n_steps must be an integer >= 1, got 0"),
    (["editor=memit", "editor.clamp_factor=-1"], "error: editor.clamp_factor must be > 0, got -1"),
    (["editor=locft_bf", "editor.batch_size=0"], "error: editor.batch_size must be an integer >= 1, got 0"),
    (["editor=emmet", "editor.lam_e=-0.5"], "error: editor.lam_e must be >= 0, got -0.5"),
    (["data.n_edits=0"], "error: data.n_edits must be an integer >= 1, got 0"),
    (["prefix_cache_gb=-1"], "error: prefix_cache_gb must be a number of GiB >= 0 (0 keeps nothing), got -1"),
    (["editor=memit", "editor.layers=2"], "error: editor.layers must be a non-empty list of layer indices >= 0, "
                                         "e.g. editor.layers=[5], got 2"),
    (["editor=emmet", "editor.layers=[1,1]"], "error: editor.layers lists a layer twice: [1, 1] (each critical "
                                              "layer is edited once)"),
    (["editor=emmet", "editor.lam=0"], "error: editor.lam must be > 0 for emmet, got 0: it scales the key "
                                       "statistics C, and EMMET's solve inverts lambda C"),
])
def test_setting_out_of_range_is_one_line_naming_the_key(tmp_path, args, line):
    """A number of the right kind but out of range (n_steps=0 would report targets never optimised)."""
    code, err, modules, _ = main_py(tmp_path, "model=tiny-gpt2", "data=zsre", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err == [line], err
    assert not modules & set(HEAVY) and not (tmp_path / "run").exists()


def test_validation_file_smaller_than_m_is_refused_before_torch(tmp_path):
    valid = write_records(tmp_path / "valid.json", qa_records(6), "zsre")
    code, err, modules, _ = main_py(tmp_path, "model=tiny-gpt2", "data=zsre", "editor=ft", f"data.valid_path={valid}",
                                    "data.n_edits=8", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err == [f"error: {valid}: has 6 records, fewer than data.n_edits=8: no validation group "
                                 "of m edits"], err
    assert not modules & set(HEAVY) and not (tmp_path / "run").exists()


def test_override_problems_in_process():
    assert override_problem(["-m", "editor=malmen,memit", "editor.lam=3"]) == (
        "editor.lam=3: the config with editor=malmen has no key 'editor.lam'; to add a new key, write +editor.lam=3")
    assert override_problem(["editor=ft", "editor.lr_init=0.1"]) == (
        "editor.lr_init=0.1: the config with editor=ft has no key 'editor.lr_init'; to add a new key, write "
        "+editor.lr_init=0.1")
    assert override_problem(["hydra.run.dr=x"]).endswith("did you mean hydra.run.dir?")
    assert override_problem(["+seed=3"]).startswith("+seed=...: the config already has 'seed'")
    assert override_problem(["editor=malmen,mend"]).startswith("editor=malmen,mend: a comma-separated value is a sweep")
    assert override_problem(["mode=["]).startswith("cannot read the override 'mode=['")
    # a value of the wrong kind: refused now, not after minutes of toy pretraining with a TypeError
    assert override_problem(["data.n_edits=abc"]) == (
        "data.n_edits=abc: data.n_edits takes an integer (its default is 64), not 'abc'")
    assert override_problem(["editor.lr_init=fast"]).startswith("editor.lr_init=fast: editor.lr_init takes a number")
    assert override_problem(["cache_pre_edit=maybe"]).startswith("cache_pre_edit=maybe: cache_pre_edit takes true")
    for fine in (["+foo=1", "++data.n_edits=3", "~seed"], ["editor.lr_init=1", "max_train_steps=3"], ["-m", "editor=malmen,mend", "data.n_edits=1,2"],
                 ["-m", "experiment=toy_table"], ["hydra/launcher=joblib"], ["--help", "edtor=x"], []):
        assert override_problem(fine) is None, fine


def test_valid_multirun_and_added_keys_reach_the_run(tmp_path):
    """-m sweeps and +/++ overrides pass the check and Hydra composes them: each job's own checks answer."""
    code, err, _, _ = main_py(tmp_path, "-m", "editor=malmen,mend", "seed=0,1", "+note=hi", "++data.n_edits=3",
                              "n_epochs=-1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2 and err == ["error: n_epochs must be a non-negative integer, got -1"], err


def test_toy_model_refuses_unknown_words_before_pretraining(tmp_path):
    """model=toy-gpt2 with an empty cache: the world is written (seconds), the toy LM is never pretrained."""
    (tmp_path / "facts.json").write_text(json.dumps([{"prompt": "Zorblax Quux", "answer": "Mars"}]))
    cache, world = tmp_path / "cache", [o for o in TINY_WORLD if o.startswith(("experiment", "data.world", "model.pretrain"))]
    code, err, _, _ = main_py(tmp_path, "mode=edit", "editor=ft", f"edit.facts={tmp_path / 'facts.json'}",
                              *world, f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and err[-1].startswith(
        f"error: {tmp_path / 'facts.json'}: record 0: field 'prompt': prompt has 2 word(s) outside the model's "
        "word-level vocabulary: 'Zorblax', 'Quux'"), err
    assert "only knows the synthetic world's vocabulary" in err[-1]  # data.collate's own message
    assert not any("pretrain toy LM" in ln for ln in err) and not list(cache.glob("toy-*"))
    assert not (tmp_path / "run").exists()


def test_max_valid_steps_0_meta_trains_without_validation(tmp_path):
    results = run(train_cfg(tmp_path, "max_train_steps=1", "max_valid_steps=0"), tmp_path)
    assert results["final"] is None and results["pre_edit"] is None and results["valid"] == []
    assert len(results["train"]) == 1 and (tmp_path / "checkpoint.pt").is_file()

    def finite_only(name):
        raise AssertionError(f"results.json holds {name}")
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=finite_only)
    assert saved["final"] is None and saved["pre_edit"] is None
    assert all(math.isfinite(v) for row in saved["train"] for v in row.values() if isinstance(v, float))
    md = (tmp_path / "results.md").read_text()
    assert "No validation (max_valid_steps=0)" in md and "| ES |" not in md and "nan" not in md.lower()
    assert md == results_markdown(saved, tmp_path)
    assert "no validation (max_valid_steps=0)" in terminal_summary(results, "train", tmp_path)
    with pytest.raises(ValueError, match="max_valid_steps=0 skips validation, and editor ft does not meta-train"):
        check_config(make_cfg("model=tiny-gpt2", "data=zsre", "editor=ft", "max_valid_steps=0"))

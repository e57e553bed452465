"""Rerunning a command finishes what is missing (pipeline/rerun.py): a run directory that holds results.json of the
same config is kept, in about a second and without torch; one of another config is refused, naming the keys; an
interrupted meta-training resumes from its checkpoint.pt without editor.resume=true, to the same numbers. A sweep's
runs have fixed folders, so that rerunning it keeps its finished runs."""
import json
import os
import subprocess
import sys

from pipeline.experiment import run
from pipeline.rerun import differences
from tests.helpers import ROOT, make_cfg, qa_records, write_records

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def main_py(*args: str) -> tuple[int, str, str, set[str]]:
    """`python -X importtime main.py ARGS`: exit code, stdout, stderr without the import times, top-level modules."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "main.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    modules = {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in lines if ln.startswith("import time:")}
    return proc.returncode, proc.stdout, "\n".join(ln for ln in lines if not ln.startswith("import time:")), modules


def overrides(folder, *extra: str) -> list[str]:
    """tiny-gpt2 MALMEN on 8 training records (folder/train.json), m = 4: two meta-steps per epoch."""
    train = write_records(folder / "train.json", qa_records(8), "zsre")
    valid = write_records(folder / "valid.json", qa_records(4, start=100), "zsre")
    return ["model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32", "editor.lr_init=1e-3",
            f"data.train_path={train}", f"data.valid_path={valid}", "data.n_edits=4", "data.batch_size=3",
            f"cache_dir={folder / 'cache'}", *extra]


def test_an_interrupted_run_resumes_by_itself_then_is_kept_and_another_config_is_refused(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    reference = run(make_cfg(*overrides(whole, "n_epochs=2")), whole)  # 4 meta-steps over 2 epochs
    run(make_cfg(*overrides(cut, "n_epochs=2", "max_train_steps=3", "save_every=1")), cut)
    (cut / "results.json").unlink()  # as if stopped after the checkpoint of step 3
    args = overrides(cut, "n_epochs=2", f"hydra.run.dir={cut}")
    code, out, err, _ = main_py(*args)
    assert code == 0 and f"resuming: {cut} (checkpoint.pt)" in out, err[-2000:]
    resumed = json.loads((cut / "results.json").read_text())
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4]  # steps 1-3 from the checkpoint, not taken again
    assert resumed["train"] == reference["train"] and resumed["valid"] == reference["valid"]

    code, out, err, modules = main_py(*args, "threads=2")  # threads: the same run, in another summation order
    assert (code, out) == (0, f"kept: {cut} (results.json)\n"), err[-2000:]
    assert "torch" not in modules and json.loads((cut / "results.json").read_text()) == resumed

    code, out, err, modules = main_py(*args, "data.n_edits=2", "editor.lr_init=1e-2")
    assert code == 2 and "torch" not in modules
    assert err == (f"error: {cut} holds results.json of another config, which this run would overwrite (data.n_edits: "
                   "results.json 4, this run 2; editor.lr_init: results.json 0.001, this run 0.01): give it another "
                   "hydra.run.dir"), err
    assert json.loads((cut / "results.json").read_text()) == resumed  # nothing overwritten


def test_a_finished_meta_training_goes_on_only_when_asked(tmp_path):
    """A longer budget in the same folder: refused, the refusal says editor.resume=true continues it."""
    results = run(make_cfg(*overrides(tmp_path, "max_train_steps=1")), tmp_path)
    args = overrides(tmp_path, "max_train_steps=2", f"hydra.run.dir={tmp_path}")
    code, _, err, _ = main_py(*args)
    assert code == 2 and err.endswith("(max_train_steps: results.json 1, this run 2): give it another hydra.run.dir, or "
                                      "add editor.resume=true to meta-train its checkpoint.pt on to this budget"), err
    code, out, err, _ = main_py(*args, "editor.resume=true")
    assert code == 0 and f"resuming: {tmp_path} (checkpoint.pt)" in out, err[-2000:]
    longer = json.loads((tmp_path / "results.json").read_text())
    assert longer["train"][:1] == results["train"] and len(longer["train"]) == 2


def test_what_differs_leaves_out_where_a_run_computes_and_the_paths_it_fills_in():
    saved = {"seed": 0, "threads": 1, "cache_dir": "a", "model": {"name_or_path": "cache/toy-1", "dtype": "float32"},
             "editor": {"name": "malmen", "resume": True, "_target_": "editor.malmen.MALMEN"}}
    same = {"seed": 0, "threads": 2, "cache_dir": "b", "model": {"name_or_path": None, "dtype": "float32"},
            "editor": {"name": "malmen", "resume": False, "_target_": "editor.malmen.MALMEN"}}
    assert differences(saved, same) == []
    other = {**same, "seed": 1, "model": {"name_or_path": "other", "dtype": "float32"}, "curriculum": None}
    assert differences(saved, other) == ["curriculum: results.json '<absent>', this run None",
                                         "model.name_or_path: results.json 'cache/toy-1', this run 'other'",
                                         "seed: results.json 0, this run 1"]


def test_sweep_folders_name_the_cell_not_the_order_of_the_jobs(tmp_path):
    """Rerunning a sweep with another grid (here: one more seed) finds its finished cells in the same folders."""
    sweep = tmp_path / "sweep"
    grid = {"editor=malmen": "editor=malmen,ft", "editor.rank=32": "++editor.rank=32", "editor.lr_init=1e-3":
            "++editor.lr_init=1e-3"}  # ++: FT has neither key, and its class takes neither (build_editor)
    base = ["-m", *(grid.get(o, o) for o in overrides(tmp_path, "max_train_steps=1", "max_valid_steps=1")),
            f"hydra.sweep.dir={sweep}"]
    code, _, err, _ = main_py(*base, "seed=1")
    assert code == 0, err[-2000:]
    code, out, err, _ = main_py(*base, "seed=0,1")
    assert code == 0, err[-2000:]
    cells = sorted(p.parent.name for p in sweep.glob("*/results.json"))
    assert cells == [f"tiny-gpt2_zsre_{e}_none_m4_s{s}" for e in ("ft", "malmen") for s in (0, 1)]
    assert out.count("kept: ") == 2 and f"kept: {sweep / 'tiny-gpt2_zsre_ft_none_m4_s1'} (results.json)" in out

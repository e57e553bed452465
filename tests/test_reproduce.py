"""Reproducibility: the tiny default pipeline is bit-identical across thread environments,
the toy LM's cache is keyed by the thread count, results carry their environment, and
scripts/readme_tables.py turns results.json trees into the README's tables and checks a rerun."""
import csv
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipeline.experiment import run
from scripts.readme_tables import main as tables_main
from scripts.readme_tables import provenance
from scripts.runs import find_runs, label, summarize
from tests.conftest import ROOT, make_cfg
from tests.test_default import TINY_WORLD
from util import run_environment, started_from

FAST = [*TINY_WORLD, "n_epochs=2", "model.pretrain.epochs=20"]  # later overrides win


# ----- determinism --------------------------------------------------------------------------------
def test_two_runs_from_empty_caches_are_bit_identical_whatever_the_thread_environment(tmp_path):
    """python main.py twice, same seed, config threads=1, OMP/MKL threads 1 and 2, run side by side."""
    procs = {}
    for n in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        procs[n] = subprocess.Popen(
            [sys.executable, "main.py", *FAST, "seed=0", "threads=1", f"cache_dir={tmp_path / n / 'cache'}",
             f"hydra.run.dir={tmp_path / n / 'run'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    for p in procs.values():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    a, b = (json.loads((tmp_path / n / "run" / "results.json").read_text()) for n in ("1", "2"))
    for key in ("pre_edit", "final", "valid", "train"):
        assert a[key] == b[key], key  # exact: every float of every group and meta-step
    assert a["environment"]["threads"] == b["environment"]["threads"] == 1  # the config wins over OMP
    lm_a, lm_b = (sorted((tmp_path / n / "cache").glob("toy-*")) for n in ("1", "2"))
    assert len(lm_a) == 1 and [p.name for p in lm_a] == [p.name for p in lm_b]  # same cache key
    wa, wb = load_file(lm_a[0] / "model.safetensors"), load_file(lm_b[0] / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_toy_lm_cache_is_keyed_by_the_thread_count(tmp_path):
    """threads=1 and threads=2 in the config pretrain two LMs; threads=1 again reuses the first."""
    before, names = torch.get_num_threads(), []
    try:
        for i, threads in enumerate((1, 2, 1)):
            cfg = make_cfg(*TINY_WORLD, "model.pretrain.epochs=1", f"threads={threads}", f"cache_dir={tmp_path}",
                           "n_epochs=0", "max_valid_steps=1")
            results = run(cfg, tmp_path / f"run{i}")
            names.append(results["config"]["model"]["name_or_path"])
            assert results["environment"]["threads"] == threads
    finally:
        torch.set_num_threads(before)
    assert names[0] != names[1] and names[0] == names[2]
    assert len(list(tmp_path.glob("toy-*"))) == 2
    assert json.loads((tmp_path / names[1].rsplit("/", 1)[1] / "pretrain.json").read_text())["threads"] == 2


def test_run_environment_is_fast_and_never_fails(monkeypatch):
    start = time.time()
    env = run_environment()
    assert time.time() - start < 5
    assert env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__
    assert env["cpu_count"] >= 1 and env["date"][:2] == "20" and env["transformers"]
    if (ROOT / ".git").exists():
        assert len(env["commit"]) >= 7 and isinstance(env["dirty"], bool)
    monkeypatch.setenv("PATH", "")  # no git on the PATH: no commit, no error
    assert (run_environment()["commit"], run_environment()["dirty"]) == (None, None)


# ----- scripts/readme_tables.py on hand-made results ----------------------------------------------
ENV = {"commit": "abc1234", "dirty": False, "cpu": "Test CPU", "cpu_count": 2, "threads": 1, "gpu": None,
       "torch": "2.0", "transformers": "5.0", "load_1min": 0.5, "date": "2026-01-02T10:00:00+00:00"}


def test_results_name_the_commit_a_run_started_from():
    """A run imports the code of the commit it started from; the checkout may move while it runs."""
    end = {**ENV, "commit": "def5678", "load_1min": 2.0}
    env = started_from(ENV, end)
    assert env["commit"] == "abc1234" and env["load_1min"] == 2.0  # the rest is the end's
    assert env["checkout_changed"] == {"commit": "def5678", "dirty": False}
    assert "checkout_changed" not in started_from(ENV, {**ENV, "load_1min": 3.0})
    text = provenance([SimpleNamespace(environment=env)])  # the README tables' line under each table
    assert "Commit abc1234 (checkout moved to def5678 during the run)" in text
    edited = started_from(ENV, {**ENV, "dirty": True})  # the same commit, its files edited while the run ran
    assert "Commit abc1234 (checkout moved to abc1234 with uncommitted changes during the run)" in provenance(
        [SimpleNamespace(environment=edited)])


def write_result(path, *, final, pre=(0.0, 0.0, 1.0), editor="malmen", variant="none", seed=0, m=256,
                 n_epochs=40, env=ENV, overrides=None, trained=None):
    """A results.json (and .hydra/overrides.yaml) as main.py writes them, with the fields the tables read;
    `trained`: the m the hyper-network was meta-trained at (None: the run's own m)."""
    config = {"model": {"name": "toy-gpt2"}, "data": {"name": "synthetic", "n_edits": m}, "editor": {"name": editor},
              "variant": variant, "seed": seed, "paper_result": None, "n_epochs": n_epochs}
    metrics = ("ES", "GS", "LS")
    res = {"config": config, "final": dict(zip(metrics, final)), "pre_edit": dict(zip(metrics, pre)),
           "time_s": 1.0, "peak_memory_mb": 1.0, "environment": env}
    if editor in ("malmen", "mend"):
        res["trained"] = {"m": trained or m, "token": "ans", "loss_reduction": "token_mean"}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(res))  # NaN and Infinity as Python's json writes them
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


@pytest.fixture
def sweep(tmp_path):
    """MALMEN over seeds 0-2 (a multirun), one MEND run without a recorded environment."""
    root = tmp_path / "sweep"
    for seed, final, load, day in ((0, (0.4, 0.2, 1.0), 0.5, "02"), (1, (0.5, 0.2, 0.9), 1.5, "03"),
                                   (2, (0.9, 0.2, 0.8), 1.0, "02")):
        write_result(root / f"{seed}_malmen", final=final, seed=seed, overrides=[f"seed={seed}", "n_epochs=40"],
                     pre=(0.0, 0.0, 0.96 if seed == 1 else 1.0),  # seed 1's groups: another level before editing
                     env={**ENV, "load_1min": load, "date": f"2026-01-{day}T10:00:00+00:00"})
    write_result(root / "mend", final=(0.125, 0.25, 0.75), editor="mend", env=None, overrides=["editor=mend"])
    return root


def tables(capsys, *args):
    code = tables_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_means_stds_before_row_and_provenance(sweep, capsys):
    code, out, _ = tables(capsys, "table", sweep)
    assert code == 0
    lines = out.splitlines()
    assert lines[:5] == [
        "| m = 256 (toy-gpt2, synthetic) | seeds | ES | GS | LS |", "|---|---|---|---|---|",
        # pre_edit, one value per seed (seed 0: MALMEN's and MEND's, equal): LS 1, 0.96, 1 -> mean 0.9867,
        # std over the 3 seeds sqrt((2 * 0.01333^2 + 0.02667^2) / 3) = 0.0189
        "| before editing | 3 | 0.000 (0.000) | 0.000 (0.000) | 0.987 (0.019) |",
        "| MEND | 1 | 0.125 | 0.250 | 0.750 |",  # one seed: the mean alone
        # ES 0.4, 0.5, 0.9 -> 0.6, sqrt((0.04 + 0.01 + 0.09) / 3) = 0.216; LS 1, 0.9, 0.8 -> 0.9, 0.0816
        "| MALMEN | 3 | 0.600 (0.216) | 0.200 (0.000) | 0.900 (0.082) |"]
    note = lines[6]
    assert "MEND: `python main.py editor=mend`" in note
    assert "MALMEN: `python main.py -m seed=0,1,2 n_epochs=40`" in note
    assert "Commit abc1234;" in note and "Test CPU, 2 cores, torch threads 1, no GPU" in note
    assert "load (1 min, at the end) 0.50–1.50" in note and "date 2026-01-02 to 2026-01-03" in note
    assert "environment not recorded for 1 of 4 runs" in note


def test_table_refuses_runs_of_one_seed_with_other_levels_before_editing(sweep, capsys):
    """Editors of one seed edit the same groups; a different pre_edit means other groups (e.g. another
    max_valid_steps): one value for the row would be neither run's."""
    write_result(sweep / "ft", final=(0.3, 0.2, 0.9), pre=(0.0, 0.1, 1.0), editor="ft", overrides=["editor=ft"])
    code, _, err = tables(capsys, "table", sweep)
    assert code == 2 and "field 'pre_edit'" in err and "GS" in err and "seed 0" in err, err


def test_table_rows_by_a_config_key(tmp_path, capsys):
    for n in (10, 100, 40):  # seed 0 each: one row per n_epochs, by value
        write_result(tmp_path / f"e{n}", final=(n / 200, 0.1, 0.9), n_epochs=n)
    code, out, _ = tables(capsys, "table", tmp_path, "--by", "n_epochs")
    assert code == 0
    assert [ln.split(" | ")[0] for ln in out.splitlines()[3:6]] == [
        "| MALMEN, n_epochs=10", "| MALMEN, n_epochs=40", "| MALMEN, n_epochs=100"]
    assert "| MALMEN, n_epochs=100 | 1 | 0.500 | 0.100 | 0.900 |" in out
    assert "command not recorded" in out and "Commit abc1234" in out
    code, _, err = tables(capsys, "table", tmp_path)  # without --by: three runs of seed 0 in one row
    assert code == 2 and "seed 0 of the same setting" in err


def test_non_finite_values_are_never_printed_as_numbers(tmp_path, capsys):
    write_result(tmp_path / "a", final=(float("nan"), 0.5, float("inf")), seed=0)
    write_result(tmp_path / "b", final=(0.5, 0.5, 0.5), seed=1)
    code, out, _ = tables(capsys, "table", tmp_path, "--csv", tmp_path / "t.csv")
    assert code == 0
    row = next(ln for ln in out.splitlines() if ln.startswith("| MALMEN"))
    assert row == ("| MALMEN | 2 | n/a (non-finite in 1 of 2 runs) | 0.500 (0.000) | n/a (non-finite in 1 of 2 runs) |")
    assert "nan" not in out.lower() and "inf " not in out
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["row"] for r in rows] == ["before editing", "MALMEN"]
    assert rows[1]["ES"] == "n/a (non-finite in 1 of 2 runs)" and rows[1]["GS"] == "0.500 (0.000)"
    assert rows[1]["n"] == "2" and rows[1]["seeds"] == "0 1"


def test_table_commands_name_no_path_of_the_machine(tmp_path, capsys):
    """Outside the repository, real_lm.sh's layout (DIR/split, DIR/results) and a checkpoint: under DIR; the
    default cache left out, another one CACHE; a path inside the repository relative to its root."""
    out = tmp_path / "real_lm"
    common = ["experiment=real_lm_zsre", f"split_dir={out / 'split'}", f"cache_dir={ROOT / 'cache'}"]
    write_result(out / "results" / "located" / "0", final=(0.9, 0.8, 0.2), editor="memit",
                 overrides=[*common, "editor=memit"])
    write_result(out / "results" / "trained" / "0", final=(0.9, 0.8, 0.2), overrides=[
        *common, "editor=malmen", f"editor.checkpoint={out / 'train' / 'malmen_s0' / 'checkpoint.pt'}"])
    write_result(tmp_path / "other", final=(0.5, 0.4, 0.9), m=128, overrides=[
        f"cache_dir={tmp_path / 'cache'}", f"data.train_path={ROOT / 'datasets' / 'train.json'}"])
    code, text, _ = tables(capsys, "table", tmp_path, "--made-by", "OUT=DIR scripts/real_lm.sh", "--csv",
                           tmp_path / "t.csv")
    assert code == 0
    notes = [ln for ln in text.splitlines() if ln.startswith("Commands: ")]
    commands = [c for ln in notes for c in ln.split("`")[1::2] if c.startswith("python main.py")]
    commands += [r["command"] for r in csv.DictReader(open(tmp_path / "t.csv")) if r["command"]]
    assert len(commands) == 6 and not [c for c in commands if "=/" in c or str(tmp_path) in c or str(ROOT) in c]
    assert "MEMIT: `python main.py experiment=real_lm_zsre split_dir=DIR/split editor=memit`" in notes[1]
    assert "editor.checkpoint=DIR/train/malmen_s0/checkpoint.pt`" in notes[1]
    assert "DIR: the folder that `OUT=DIR scripts/real_lm.sh` writes." in notes[1] and "CACHE" not in notes[1]
    assert "`python main.py cache_dir=CACHE data.train_path=datasets/train.json`" in notes[0]
    assert "CACHE: a cache folder of their own" in notes[0] and "DIR" not in notes[0]
    write_result(tmp_path / "far", final=(0.5, 0.4, 0.9), m=64, overrides=["data.train_path=/elsewhere/train.json"])
    code, _, err = tables(capsys, "table", tmp_path / "far")
    assert code == 2 and "share no folder but the root" in err


def test_a_hyper_network_evaluated_at_another_m_is_labelled_in_every_table(tmp_path, capsys):
    write_result(tmp_path / "own", final=(0.9, 0.8, 0.9), m=32)
    write_result(tmp_path / "other", final=(0.5, 0.4, 0.9), m=32, trained=64)
    code, text, _ = tables(capsys, "table", tmp_path)
    assert code == 0 and "| MALMEN | 1 | 0.900 |" in text and "| MALMEN (trained at m = 64) | 1 | 0.500 |" in text
    rows = {r["editor"] + str(r["trained_m"]): r for r in summarize(find_runs(tmp_path))}
    assert set(rows) == {"malmenNone", "malmen64"} and label(rows["malmen64"]) == "MALMEN (trained at m = 64)"


README = "# Title\n\nText before.\n\n<!-- table:default -->\nold table\n<!-- /table:default -->\n\nText after.\n"


def test_table_replaces_the_block_between_the_markers(sweep, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    code, out, _ = tables(capsys, "table", sweep, "--readme", readme, "--name", "default")
    assert code == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nText before.\n\n<!-- table:default -->\n| m = 256 (toy-gpt2, synthetic) |")
    assert text.endswith(".\n<!-- /table:default -->\n\nText after.\n") and "old table" not in text
    assert text.split("<!-- table:default -->\n")[1].split("<!-- /table:default -->")[0] == out
    assert tables(capsys, "table", sweep, "--readme", readme, "--name", "default")[0] == 0
    assert readme.read_text() == text  # idempotent


@pytest.mark.parametrize("name, marker", [("other", "<!-- table:other -->"), ("broken", "<!-- /table:broken -->")])
def test_table_names_a_missing_marker(sweep, tmp_path, capsys, name, marker):
    readme = tmp_path / "README.md"
    readme.write_text(README + "<!-- table:broken -->\n")
    code, _, err = tables(capsys, "table", sweep, "--readme", readme, "--name", name)
    assert code == 2 and f"marker '{marker}' not found" in err and str(readme) in err
    assert readme.read_text() == README + "<!-- table:broken -->\n"  # untouched


SEED0 = ("<!-- table:default -->\n| m = 256 | seeds | ES | GS | LS |\n|---|---|---|---|---|\n"
         "| before editing | 1 | 0.000 | 0.000 | 1.000 |\n| MALMEN | 1 | 0.488 (0.015) | 0.391 | 0.969 |\n"
         "| MEND | 1 | 0.090 | 0.094 | 0.945 |\n\nCommands: ...\n<!-- /table:default -->\n")


@pytest.mark.parametrize("final, tol, code", [((0.510, 0.370, 0.969), None, 0),   # |diff| 0.022, 0.021, 0
                                              ((0.528, 0.391, 0.969), None, 1),   # ES +0.040 > 0.03
                                              ((0.528, 0.391, 0.969), "0.05", 0),
                                              ((0.488, 0.391, float("nan")), None, 1)])
def test_check_compares_a_rerun_with_the_readme_row(tmp_path, capsys, final, tol, code):
    readme = tmp_path / "README.md"
    readme.write_text("Intro\n" + SEED0)
    write_result(tmp_path / "run", final=final)
    args = ["check", tmp_path / "run", "--readme", readme] + (["--tol", tol] if tol else [])
    got, out, err = tables(capsys, *args)
    assert got == code, out + err
    lines = [ln.split() for ln in out.splitlines()]
    assert ["MALMEN", "README", "0.488", "0.391", "0.969"] in lines
    assert ("all within the tolerance" in out) == (code == 0)
    if final[0] == 0.528:
        assert ["MALMEN", "difference", "+0.040", "+0.000", "+0.000"] in lines
        assert ("differ beyond the tolerance: MALMEN ES" in out) == (code == 1)
    assert "not measured by these runs: MEND" in out


SPREAD = ("<!-- table:default -->\n| m = 64 | seeds | ES | GS | LS |\n|---|---|---|---|---|\n"
          "| before editing | 3 | 0.030 (0.004) | 0.030 (0.005) | 1.000 (0.000) |\n"
          "| MALMEN | 3 | 0.800 (0.020) | 0.330 (0.010) | 0.900 (0.030) |\n\nCommands: ...\n<!-- /table:default -->\n")


@pytest.mark.parametrize("final, code", [((0.8604, 0.3604, 0.9904), 0),  # within 3 std + 0.0005: 0.0605 ...
                                         ((0.8606, 0.330, 0.900), 1),   # ES 0.0606 beyond 3 x 0.020 + 0.0005
                                         ((0.800, 0.300, 0.8094), 1)])  # LS 0.0906 beyond 3 x 0.030 + 0.0005
def test_check_allows_k_times_the_readme_spread(tmp_path, capsys, final, code):
    readme = tmp_path / "README.md"
    readme.write_text(SPREAD)
    write_result(tmp_path / "run", final=final, pre=(0.0304, 0.0296, 1.0))  # before editing: 0.000 std, rounding
    got, out, err = tables(capsys, "check", tmp_path / "run", "--readme", readme, "--name", "default", "--tol-std", "3")
    assert got == code, out + err
    assert ["MALMEN", "tolerance", "0.0605", "0.0305", "0.0905"] in [ln.split() for ln in out.splitlines()]
    assert "tolerance ±3 std of the README's seeds" in out
    readme.write_text(SEED0)  # a cell without a spread cannot give one
    got, _, err = tables(capsys, "check", tmp_path / "run", "--readme", readme, "--name", "default", "--tol-std", "3")
    assert got == 2 and "no spread in parentheses for before editing ES" in err


def test_check_needs_a_common_row(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(SEED0.replace("| MALMEN |", "| Something else |"))
    write_result(tmp_path / "run", final=(0.5, 0.4, 0.9))
    code, _, err = tables(capsys, "check", tmp_path / "run", "--readme", readme)
    assert code == 2 and "no row of the runs' table (before editing, MALMEN)" in err

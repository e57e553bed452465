"""The README's tables are data: scripts/readme_tables.py turns results.json trees into results/<name>/
(summary.csv, about.yaml), renders them between the README's markers, and checks a rerun against them; the
committed README and docs pages show exactly the committed data."""
import csv
import json
import re
from types import SimpleNamespace

import pytest

from scripts import readme_tables
from scripts.provenance import one_command, provenance
from scripts.readme_tables import main as tables_main
from scripts.runs import find_runs, label, summarize
from tests.helpers import ROOT
from util import started_from

ENV = {"commit": "abc1234", "dirty": False, "cpu": "Test CPU", "cpu_count": 2, "threads": 1, "gpu": None,
       "torch": "2.0", "transformers": "5.0", "load_1min": 0.5, "date": "2026-01-02T10:00:00+00:00"}


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


@pytest.fixture
def results(tmp_path, monkeypatch):
    """results/ of this test, not the repository's."""
    monkeypatch.setattr(readme_tables, "RESULTS", tmp_path / "results")
    return tmp_path / "results"


def tables(capsys, *args):
    code = tables_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_means_stds_before_row_and_provenance(sweep, capsys):
    code, out, _ = tables(capsys, "table", sweep)
    assert code == 0
    lines = out.splitlines()
    assert lines[2:7] == [
        "| m | editor | seeds | ES | GS | LS |", "|---|---|---|---|---|---|",
        # pre_edit, one value per seed (seed 0: MALMEN's and MEND's, equal): LS 1, 0.96, 1 -> mean 0.9867,
        # std over the 3 seeds sqrt((2 * 0.01333^2 + 0.02667^2) / 3) = 0.0189
        "| 256 | before editing | 3 | 0.000 (0.000) | 0.000 (0.000) | 0.987 (0.019) |",
        "| 256 | MEND | 1 | 0.125 | 0.250 | 0.750 |",  # one seed: the mean alone
        # ES 0.4, 0.5, 0.9 -> 0.6, sqrt((0.04 + 0.01 + 0.09) / 3) = 0.216; LS 1, 0.9, 0.8 -> 0.9, 0.0816
        "| 256 | MALMEN | 3 | 0.600 (0.216) | 0.200 (0.000) | 0.900 (0.082) |"]
    command, note = lines[8], lines[9]
    assert command == "Command: `python main.py`, per row: editor, seed, n_epochs (summary.csv: command)."
    assert note.startswith("Provenance: code abc1234; Test CPU, 2 cores, 1 torch thread(s), no GPU, torch 2.0; ")
    assert "load 0.5–1.5; 2026-01-02 to 2026-01-03; environment not recorded for 1 of 4 runs." in note


def test_one_command_writes_the_shared_overrides_once():
    grid = [f"python main.py experiment=x split_dir=DIR/split editor={e} data.n_edits={m}"
            for m in (128, 256) for e in ("malmen", "ft")]
    assert one_command(grid) == ("python main.py -m experiment=x split_dir=DIR/split editor=malmen,ft "
                                 "data.n_edits=128,256", "")
    assert one_command(grid[:3]) == ("python main.py experiment=x split_dir=DIR/split", "editor, data.n_edits")
    assert one_command(["python main.py -m seed=0,1,2 threads=1"]) == ("python main.py -m seed=0,1,2 threads=1", "")


def test_provenance_names_the_commits_a_run_started_and_ended_at():
    """A run imports the code of the commit it started from; the checkout may move while it runs."""
    end = {**ENV, "commit": "def5678", "load_1min": 2.0}
    env = started_from(ENV, end)
    assert env["commit"] == "abc1234" and env["load_1min"] == 2.0  # the rest is the end's
    assert env["checkout_changed"] == {"commit": "def5678", "dirty": False}
    assert "checkout_changed" not in started_from(ENV, {**ENV, "load_1min": 3.0})
    text = provenance([SimpleNamespace(environment=env)])  # the one line under each table
    assert text.startswith("code abc1234 … def5678 (2 commits), the checkout moving during some runs; ")
    edited = started_from(ENV, {**ENV, "dirty": True})  # the same commit, its files edited while the run ran
    assert provenance([SimpleNamespace(environment=edited)]).startswith(
        "code abc1234, with uncommitted changes, the checkout moving during some runs; ")


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
    assert [ln.split(" | ")[1] for ln in out.splitlines()[5:8]] == [
        "MALMEN, n_epochs=10", "MALMEN, n_epochs=40", "MALMEN, n_epochs=100"]
    assert "| 256 | MALMEN, n_epochs=100 | 1 | 0.500 | 0.100 | 0.900 |" in out
    assert "command not recorded" in out and "code abc1234" in out
    code, _, err = tables(capsys, "table", tmp_path)  # without --by: three runs of seed 0 in one row
    assert code == 2 and "seed 0 of the same setting" in err


def test_non_finite_values_are_never_shown_as_numbers(tmp_path, results, capsys):
    write_result(tmp_path / "a", final=(float("nan"), 0.5, float("inf")), seed=0)
    write_result(tmp_path / "b", final=(0.5, 0.5, 0.5), seed=1)
    code, out, _ = tables(capsys, "table", tmp_path / "a", tmp_path / "b", "--save", "t")
    assert code == 0
    row = next(ln for ln in out.splitlines() if "| MALMEN" in ln)
    assert row == "| 256 | MALMEN | 2 | n/a (non-finite in 1 of 2 runs) | 0.500 (0.000) | n/a (non-finite in 1 of 2 runs) |"
    assert not re.search(r"\b(nan|inf)\b", out.lower())
    rows = list(csv.DictReader(open(results / "t" / "summary.csv")))
    assert [r["row"] for r in rows] == ["before editing", "MALMEN"] and rows[1]["seeds"] == "0 1"
    assert rows[1]["ES"] == "nan" and rows[1]["GS"] == "0.5" and rows[1]["GS_std"] == "0.0"  # data, not a view
    shown = readme_tables.view("t", tmp_path / "README.md")
    assert "| 256 | MALMEN | 2 | n/a (non-finite) | 0.500 (0.000) | n/a (non-finite) |" in shown
    assert not re.search(r"\b(nan|inf)\b", shown.lower())


def test_table_commands_name_no_path_of_the_machine(tmp_path, results, capsys):
    """Outside the repository, real_lm.sh's layout (DIR/split, DIR/results) and a checkpoint: under DIR; the
    default cache left out, another one CACHE; a path inside the repository relative to its root."""
    out = tmp_path / "real_lm"
    common = ["experiment=real_lm_zsre", f"split_dir={out / 'split'}", f"cache_dir={ROOT / 'cache'}"]
    write_result(out / "results" / "located" / "0", final=(0.9, 0.8, 0.2), editor="memit",
                 overrides=[*common, "editor=memit"])
    write_result(out / "results" / "trained" / "0", final=(0.9, 0.8, 0.2), overrides=[
        *common, "editor=malmen", f"editor.checkpoint={out / 'train' / 'malmen_s0' / 'checkpoint.pt'}"])
    code, text, _ = tables(capsys, "table", out, "--made-by", "OUT=DIR scripts/real_lm.sh", "--save", "real")
    assert code == 0
    rows = {r["row"]: r["command"] for r in csv.DictReader(open(results / "real" / "summary.csv"))}
    assert rows["MEMIT"] == "python main.py experiment=real_lm_zsre split_dir=DIR/split editor=memit"
    assert rows["MALMEN"].endswith("editor=malmen editor.checkpoint=DIR/train/malmen_s0/checkpoint.pt")
    assert "Command: `OUT=DIR scripts/real_lm.sh` (DIR: the folder that `OUT=DIR scripts/real_lm.sh` writes)." in text
    write_result(tmp_path / "other", final=(0.5, 0.4, 0.9), m=128, overrides=[
        f"cache_dir={tmp_path / 'cache'}", f"data.train_path={ROOT / 'datasets' / 'train.json'}"])
    code, text, _ = tables(capsys, "table", tmp_path / "other")
    assert "Command: `python main.py cache_dir=CACHE data.train_path=datasets/train.json` (CACHE: a cache folder" in text
    saved = (results / "real" / "summary.csv").read_text() + (results / "real" / "about.yaml").read_text()
    assert "=/" not in saved and str(tmp_path) not in saved and str(ROOT) not in saved + text
    write_result(tmp_path / "far", final=(0.5, 0.4, 0.9), m=64, overrides=["data.train_path=/elsewhere/train.json"])
    code, _, err = tables(capsys, "table", tmp_path / "far")
    assert code == 2 and "share no folder but the root" in err


def test_a_hyper_network_evaluated_at_another_m_is_labelled_in_every_table(tmp_path, capsys):
    write_result(tmp_path / "own", final=(0.9, 0.8, 0.9), m=32)
    write_result(tmp_path / "other", final=(0.5, 0.4, 0.9), m=32, trained=64)
    code, text, _ = tables(capsys, "table", tmp_path)
    assert code == 0 and "| 32 | MALMEN | 1 | 0.900 |" in text and "| 32 | MALMEN (trained at m = 64) | 1 | 0.500 |" in text
    rows = {r["editor"] + str(r["trained_m"]): r for r in summarize(find_runs(tmp_path))}
    assert set(rows) == {"malmenNone", "malmen64"} and label(rows["malmen64"]) == "MALMEN (trained at m = 64)"


README = "# Title\n\nText before.\n\n<!-- table:default -->\nold table\n<!-- /table:default -->\n\nText after.\n"


def test_the_readme_block_is_a_view_of_the_saved_data(sweep, tmp_path, results, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    code, out, _ = tables(capsys, "table", sweep, "--save", "default", "--readme", readme)
    assert code == 0 and sorted(p.name for p in (results / "default").iterdir()) == ["about.yaml", "summary.csv"]
    text = readme.read_text()
    assert text.startswith("# Title\n\nText before.\n\n<!-- table:default -->\ntoy-gpt2, synthetic, mean (std over seeds")
    assert text.endswith("Data and each row's command: [results/default/](results/default/).\n<!-- /table:default -->"
                         "\n\nText after.\n") and "old table" not in text
    assert "| 256 | MALMEN | 3 | 0.600 (0.216) | 0.200 (0.000) | 0.900 (0.082) |" in text
    assert tables(capsys, "readme", "--readme", readme, "--check")[0] == 0
    summary = results / "default" / "summary.csv"  # the data changes: the README no longer shows it
    summary.write_text(summary.read_text().replace("0.6,", "0.61,"))
    code, out, _ = tables(capsys, "readme", "--readme", readme, "--check")
    assert code == 1 and "block default differs from results/default/" in out and readme.read_text() == text
    assert tables(capsys, "readme", "--readme", readme)[0] == 0  # rendered again
    assert "| 256 | MALMEN | 3 | 0.610 (0.216) |" in readme.read_text()
    assert tables(capsys, "readme", "--readme", readme, "--check")[0] == 0


@pytest.mark.parametrize("name, marker", [("other", "<!-- table:other -->"), ("broken", "<!-- /table:broken -->")])
def test_table_names_a_missing_marker(sweep, tmp_path, results, capsys, name, marker):
    readme = tmp_path / "README.md"
    readme.write_text(README + "<!-- table:broken -->\n")
    code, _, err = tables(capsys, "table", sweep, "--save", name, "--readme", readme)
    assert code == 2 and f"marker '{marker}' not found" in err and str(readme) in err
    assert readme.read_text() == README + "<!-- table:broken -->\n"  # untouched


def test_every_committed_page_shows_its_data_and_every_table_is_shown():
    """README.md and the docs pages hold only what results/ holds (rendered by `readme_tables.py readme`)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        assert readme_tables.main(["readme", "--readme", str(page), "--check"]) == 0, page
    names = [p.name for p in (ROOT / "results").iterdir() if (p / "about.yaml").is_file()]
    shown = " ".join(p.read_text() for p in pages)
    assert names and all(f"<!-- table:{n} -->" in shown for n in names)


@pytest.fixture
def seed0(tmp_path, results, capsys):
    """results/default of one seed: before editing, MALMEN with a std, MEND."""
    for name, editor, final in (("a", "malmen", (0.488, 0.391, 0.969)), ("b", "mend", (0.090, 0.094, 0.945))):
        write_result(tmp_path / "data" / name, final=final, editor=editor)
    assert tables(capsys, "table", tmp_path / "data", "--save", "default")[0] == 0
    path = results / "default" / "summary.csv"
    path.write_text(path.read_text().replace("0.488,,", "0.488,0.015,"))  # MALMEN ES's std: 0.015
    return results


@pytest.mark.parametrize("final, tol, code", [((0.510, 0.370, 0.969), None, 0),   # |diff| 0.022, 0.021, 0
                                              ((0.528, 0.391, 0.969), None, 1),   # ES +0.040 > 0.03
                                              ((0.528, 0.391, 0.969), "0.05", 0),
                                              ((0.488, 0.391, float("nan")), None, 1)])
def test_check_compares_a_rerun_with_the_data(tmp_path, seed0, capsys, final, tol, code):
    write_result(tmp_path / "run", final=final)
    args = ["check", tmp_path / "run", "--name", "default"] + (["--tol", tol] if tol else [])
    got, out, err = tables(capsys, *args)
    assert got == code, out + err
    lines = [ln.split() for ln in out.splitlines()]
    assert ["MALMEN", "data", "0.488", "0.391", "0.969"] in lines
    assert ("all within the tolerance" in out) == (code == 0)
    if final[0] == 0.528:
        assert ["MALMEN", "difference", "+0.040", "+0.000", "+0.000"] in lines
        assert ("differ beyond the tolerance: MALMEN ES" in out) == (code == 1)
    assert "not measured by these runs: MEND" in out


@pytest.mark.parametrize("final, code", [((0.8604, 0.3604, 0.9904), 0),  # within 3 std + 0.0005: 0.0605 ...
                                         ((0.8606, 0.330, 0.900), 1),   # ES 0.0606 beyond 3 x 0.020 + 0.0005
                                         ((0.800, 0.300, 0.8094), 1)])  # LS 0.0906 beyond 3 x 0.030 + 0.0005
def test_check_allows_k_times_the_data_spread(tmp_path, results, capsys, final, code):
    for seed, f in enumerate(((0.78, 0.32, 0.87), (0.82, 0.34, 0.93), (0.80, 0.33, 0.90))):  # std 0.0163, 0.0082, 0.0245
        write_result(tmp_path / "data" / str(seed), final=f, seed=seed, pre=(0.03, 0.03, 1.0))
    assert tables(capsys, "table", tmp_path / "data", "--save", "default")[0] == 0
    path = results / "default" / "summary.csv"  # stds of 0.020, 0.010, 0.030, as a README table would round them
    rows = list(csv.DictReader(open(path)))
    rows[1].update(ES_std="0.02", GS_std="0.01", LS_std="0.03")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_result(tmp_path / "run", final=final, pre=(0.0304, 0.0296, 1.0))  # before editing: std 0, the rounding
    got, out, err = tables(capsys, "check", tmp_path / "run", "--name", "default", "--tol-std", "3")
    assert got == code, out + err
    assert ["MALMEN", "tolerance", "0.0605", "0.0305", "0.0905"] in [ln.split() for ln in out.splitlines()]
    assert "tolerance ±3 std" in out


def test_check_needs_a_common_row_and_a_spread(tmp_path, seed0, capsys):
    write_result(tmp_path / "run", final=(0.5, 0.4, 0.9), editor="ft")
    code, _, err = tables(capsys, "check", tmp_path / "run", "--name", "default")
    assert code == 2 and "no row of the runs (before editing, FT) is in the data" in err
    write_result(tmp_path / "run2", final=(0.5, 0.4, 0.9))
    code, _, err = tables(capsys, "check", tmp_path / "run2", "--name", "default", "--tol-std", "3")
    assert code == 2 and "no std for before editing ES" in err  # one seed: no spread to allow

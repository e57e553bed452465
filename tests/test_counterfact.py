"""CounterFact: both file forms, the subject-disjoint split, the download's split, the
efficacy/paraphrase/neighborhood scores against a plain forward pass, and a whole run to its tables."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.collate import Collator
from data.groups import edit_groups
from data.records import DataError, load_records
from model.lm import INPUTS, counterfact_scores
from scripts.split_records import split
from tests.helpers import ROOT, build_model, make_cfg, script_env

CF = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-train.json"
PY = sys.executable


def rome_rows(n: int, subjects: int | None = None) -> list[dict]:
    """ROME's counterfact.json form: answers of 1-3 words, so that the length-sorted batches of the new
    and the true answers come in different orders."""
    subjects = subjects or n
    words = ["English", "French language", "Old Norse dialect", "Dutch", "Latin script", "Greek"]
    return [{"case_id": i, "pararel_idx": i,
             "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                   "subject": f"Person {i % subjects}",
                                   "target_new": {"str": words[i % 6], "id": "Q1"},
                                   "target_true": {"str": words[(i + 1 + i % 2) % 6], "id": "Q2"}},
             "paraphrase_prompts": [f"Noise {i}. Person {i % subjects} spoke", f"Person {i % subjects}, a native"],
             "neighborhood_prompts": [f"Neighbor {i} is a native speaker of", f"The language of neighbor {i} is"],
             "attribute_prompts": ["unused"], "generation_prompts": ["unused"]} for i in range(n)]


def flat_rows(n: int) -> list[dict]:
    """The flat MEND/EasyEdit form of the same records."""
    out = []
    for r in rome_rows(n):
        rr = r["requested_rewrite"]
        out.append({"case_id": r["case_id"], "prompt": rr["prompt"].replace("{}", rr["subject"]),
                    "subject": rr["subject"], "target_new": rr["target_new"]["str"],
                    "ground_truth": rr["target_true"]["str"], "rephrase_prompt": r["paraphrase_prompts"][0],
                    "locality_prompt": r["neighborhood_prompts"][0],
                    "locality_ground_truth": rr["target_true"]["str"]})
    return out


def write(path: Path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def test_both_forms_map_to_the_same_tuples(tmp_path):
    rome = load_records(write(tmp_path / "rome.json", rome_rows(4)), "counterfact")
    flat = load_records(write(tmp_path / "flat.json", flat_rows(4)), "counterfact")
    for a, b in zip(rome, flat):
        assert a.prompt == b.prompt == f"The mother tongue of {a.subject} is"
        assert (a.answer, a.true_answer, a.unrel_prompt, a.unrel_answer) == \
               (b.answer, b.true_answer, b.unrel_prompt, b.unrel_answer)
        assert a.unrel_answer == a.true_answer != a.answer  # the neighborhood prompt keeps its own true answer
        assert b.equiv_prompts == a.equiv_prompts[:1] and len(a.equiv_prompts) == 2


def test_real_flat_file(shared_data):
    records = load_records(str(CF), "counterfact")
    assert len(records) == 10_000
    r = records[0]
    assert (r.prompt, r.answer, r.true_answer, r.subject) == ("Toko Yasuda, the", "piano", "guitar", "Toko Yasuda")
    assert (r.equiv_prompts, r.unrel_prompt, r.unrel_answer) == (("Toko Yasuda is incredible at",),
                                                                  "John Lennon performs on the", "guitar")


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["requested_rewrite"].pop("target_true"), "requested_rewrite.target_true"),
    (lambda r: r["requested_rewrite"]["target_new"].pop("str"), "requested_rewrite.target_new.str"),
    (lambda r: r["requested_rewrite"].update(prompt="The mother tongue is"), "requested_rewrite.prompt"),
    (lambda r: r["requested_rewrite"].update(target_new={"str": r["requested_rewrite"]["target_true"]["str"]}),
     "target_new"),
    (lambda r: r.update(neighborhood_prompts=[]), "neighborhood_prompts"),
    (lambda r: r.update(requested_rewrite="x"), "requested_rewrite"),
])
def test_bad_rome_record_is_named(tmp_path, edit, field):
    rows = rome_rows(3)
    edit(rows[2])
    with pytest.raises(DataError) as err:
        load_records(write(tmp_path / "bad.json", rows), "counterfact")
    assert (err.value.index, err.value.field) == (2, field)
    assert str(err.value).startswith(f"{tmp_path / 'bad.json'}: record 2: field '{field}'")


def test_bad_flat_record_is_named(tmp_path):
    rows = flat_rows(3)
    del rows[1]["ground_truth"]
    with pytest.raises(DataError, match=r"record 1: field 'ground_truth': missing"):
        load_records(write(tmp_path / "bad.json", rows), "counterfact")


def test_split_keeps_subjects_apart(tmp_path):
    src = write(tmp_path / "cf.json", rome_rows(40, subjects=30))  # 10 subjects with two records, 20 with one
    summary = split(src, tmp_path / "out", 28, 10, seed=3, fmt="counterfact", by_subject=True)
    parts = {p: load_records(str(tmp_path / "out" / f"{p}.json"), "counterfact") for p in ("train", "valid")}
    assert {p: len(r) for p, r in parts.items()} == {"train": 28, "valid": 10} == summary["counts"]
    assert not {r.subject for r in parts["train"]} & {r.subject for r in parts["valid"]}
    used = summary["indices"]["train"] + summary["indices"]["valid"]
    assert len(set(used)) == 38 and summary["unused"] == 2 and summary["by"] == "subject"
    assert json.loads((tmp_path / "out" / "split.json").read_text())["indices"] == summary["indices"]
    with pytest.raises(DataError, match="cannot fill valid.json with exactly 1 records of whole subjects"):
        split(write(tmp_path / "pairs.json", rome_rows(10, subjects=5)), tmp_path / "o2", 8, 1,
              fmt="counterfact", by_subject=True)  # every subject has two records


def test_real_split_8000_2000(shared_data, tmp_path):
    out = subprocess.run([PY, "scripts/split_records.py", str(CF), str(tmp_path), "--format", "counterfact",
                          "--by-subject", "--seed", "0"] + "--n-train 8000 --n-valid 2000".split(),
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "split.json").read_text())
    assert summary["counts"] == {"train": 8000, "valid": 2000} and summary["shared"]["subjects"] == 0


def test_download_splits_a_rome_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "counterfact.json", rome_rows(30, subjects=25))
    cmd = [PY, "scripts/download_data.py", "counterfact", "--from-dir", str(raw), "--out", str(tmp_path / "d"),
           "--cf-valid", "6"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "d" / "counterfact"
    assert len(load_records(str(folder / "valid.json"), "counterfact")) == 6
    assert len(load_records(str(folder / "train.json"), "counterfact")) == 24
    assert "counterfact.json" in (tmp_path / "d" / "raw" / "SHA256SUMS").read_text()
    small = subprocess.run(cmd[:-1] + ["30"], cwd=ROOT, capture_output=True, text=True)
    assert small.returncode == 2 and f"{raw / 'counterfact.json'}: has 30 records: --cf-valid 30 leaves none" in small.stderr
    (raw / "counterfact.json").write_text(json.dumps(rome_rows(29)))  # another file under the same name
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "checksum mismatch" in out.stderr


def log_p(model, tok, prompt: str, answer: str) -> float:
    """log P(answer | prompt) from one plain forward pass over the whole text, float64."""
    collator = Collator(tok, "causal")
    b = collator([prompt], [answer])
    logp = model(**{k: b[k] for k in INPUTS["causal"]}).logits.double().log_softmax(-1)[0]  # (T, V)
    return float(sum(logp[t, b["labels"][0, t]] for t in range(b["labels"].shape[1]) if b["labels"][0, t] != -100))


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_scores_equal_a_plain_forward_pass(tmp_path, model_name):
    cfg = make_cfg(f"model={model_name}")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    model.double()
    records = load_records(write(tmp_path / "cf.json", rome_rows(12)), "counterfact")
    group = next(edit_groups(records, 12, 4, Collator(tok, "causal"), seed=0, shuffle=True))
    assert group.order["edit"] != group.order["edit_true"]  # the pairing must survive different batch orders
    got = counterfact_scores(model, group, "causal", "cpu")
    p = [(log_p(model, tok, r.prompt, r.answer), log_p(model, tok, r.prompt, r.true_answer),
          log_p(model, tok, eq, r.answer), log_p(model, tok, eq, r.true_answer),
          log_p(model, tok, r.unrel_prompt, r.unrel_answer), log_p(model, tok, r.unrel_prompt, r.answer))
         for r, eq in zip(group.records, equivalents(group, tok))]
    want = {"efficacy": sum(a > b for a, b, *_ in p) / 12, "paraphrase": sum(c > d for _, _, c, d, _, _ in p) / 12,
            "neighborhood": sum(e > f for *_, e, f in p) / 12}
    assert got == pytest.approx(want, abs=1e-15)  # shares of 12: exact in float64
    assert 0 < sum(want.values()) < 3  # neither all wins nor all losses: the comparison is not trivially met


def equivalents(group, tok) -> list[str]:
    """The equivalent prompt each record of the group drew, read back from its batches."""
    texts = [tok.decode(ids[m.bool()]) for b in group.equiv for ids, m in zip(b["input_ids"], b["attention_mask"])]
    by_pos = dict(zip(group.order["equiv"], texts))
    out = []
    for i, r in enumerate(group.records):
        out.append(next(e for e in r.equiv_prompts if by_pos[i].startswith(e)))
    return out


def test_run_reports_the_scores_and_the_tables(tmp_path):
    rows = rome_rows(40, subjects=40)
    train, valid = write(tmp_path / "train.json", rows[:24]), write(tmp_path / "valid.json", rows[24:])
    run_dir = tmp_path / "results" / "malmen_m8_s0"
    out = subprocess.run([PY, "main.py", "model=tiny-gpt2", "experiment=massive_counterfact", "++model.memit=null",
                          f"data.train_path={train}", f"data.valid_path={valid}", "data.n_edits=8",
                          "max_train_steps=2", "max_valid_steps=2", f"hydra.run.dir={run_dir}",
                          f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("efficacy", "paraphrase", "neighborhood"):
        assert 0 <= res["final"][key] <= 1 and 0 <= res["pre_edit"][key] <= 1
        assert all(key in v and key in v["pre_edit"] for v in res["valid"])
    assert len(res["edit_time_s"]) == 2 and all(0 < t < res["time_s"] for t in res["edit_time_s"])  # per group
    assert "| | ES | GS | LS | efficacy | paraphrase | neighborhood |" in (run_dir / "results.md").read_text()
    assert "efficacy" in out.stdout
    agg = subprocess.run([PY, "scripts/aggregate.py", str(tmp_path / "results")], cwd=ROOT, capture_output=True,
                         text=True)
    assert agg.returncode == 0, agg.stderr
    table = (tmp_path / "results" / "massive_counterfact.md").read_text()
    assert ("| m | editor | ES | GS | LS | efficacy | paraphrase | neighborhood | ES_gen | GS_gen | LS_gen | unchanged "
            "| groups x seeds | wall s | CPU s |") in table
    unchanged = [g["generated"]["unchanged"] for g in res["valid"]]  # by greedy generation, beside the rest
    assert f" | {np.mean(unchanged):.3f} ({np.std(unchanged):.3f}) | 2 x 1 |" in table
    es_std = float(np.std([g["ES"] for g in res["valid"]]))  # the spread over the run's 2 validation groups
    assert f"| 8 | MALMEN | {res['final']['ES']:.3f} ({es_std:.3f}) |" in table and "| 8 | before editing |" in table
    assert "efficacy" in (tmp_path / "results" / "summary.csv").read_text().splitlines()[0]
    ft_dir = tmp_path / "results" / "ft_m4_s0"
    out = subprocess.run([PY, "main.py", "model=tiny-gpt2", "experiment=massive_counterfact", "editor=ft",
                          f"data.train_path={train}", f"data.valid_path={valid}", "data.n_edits=4", "max_valid_steps=1",
                          f"hydra.run.dir={ft_dir}", f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    readme = subprocess.run([PY, "scripts/readme_tables.py", "table", str(tmp_path / "results"), "--times", "--save",
                             "cf", "--results", str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True)
    assert readme.returncode == 0, readme.stderr
    lines = readme.stdout.splitlines()
    assert lines[0].startswith("tiny-gpt2, counterfact, mean (std over seeds") and lines[2] == ("| m | editor | seeds | ES | GS | LS | efficacy | "
                                                                 "paraphrase | neighborhood | ES_gen | GS_gen | LS_gen | "
                                                                 "unchanged | wall s | CPU s |")
    ft = json.loads((ft_dir / "results.json").read_text())
    assert lines[4].startswith(f"| 4 | before editing | 1 | {ft['pre_edit']['ES']:.3f} |")
    assert lines[5].startswith(f"| 4 | FT | 1 | {ft['final']['ES']:.3f} |") and lines[5].endswith(
        f" | {ft['time_s']:.0f} | {ft['cpu_time_s']:.0f} |")
    assert lines[7].startswith(f"| 8 | MALMEN | 1 | {res['final']['ES']:.3f} |")
    assert lines[9].startswith("Command: `python main.py")  # the table's one command; each row's in its data:
    commands = {(r["m"], r["row"]): r["command"] for r in csv.DictReader(open(tmp_path / "data" / "cf" / "summary.csv"))}
    assert commands["4", "FT"].startswith("python main.py") and "editor=ft" in commands["4", "FT"]
    assert commands["8", "MALMEN"].startswith("python main.py")
    by_groups = subprocess.run([PY, "scripts/readme_tables.py", "table", str(tmp_path / "results"), "--spread", "groups"],
                               cwd=ROOT, capture_output=True, text=True)
    assert by_groups.returncode == 0, by_groups.stderr
    lines = by_groups.stdout.splitlines()
    assert lines[0].startswith("tiny-gpt2, counterfact, mean (std over the validation groups of every seed")
    assert lines[2].startswith("| m | editor | groups x seeds | ES |") and lines[5].startswith("| 4 | FT | 1 x 1 | ")
    effic = [g["efficacy"] for g in res["valid"]]
    assert lines[7].startswith(f"| 8 | MALMEN | 2 x 1 | {res['final']['ES']:.3f} ({es_std:.3f}) |")
    assert f" | {np.mean(effic):.3f} ({np.std(effic):.3f}) | " in lines[7]


def test_bad_score_reduction_is_refused():
    out = subprocess.run([PY, "main.py", "data=counterfact", "data.score_reduction=median"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "data.score_reduction must be sum or mean, got 'median'" in out.stderr


def test_a_missing_counterfact_file_says_how_to_get_it(tmp_path):
    out = subprocess.run([PY, "main.py", "data=counterfact", f"data_dir={tmp_path}", "editor=ft", "model=tiny-gpt2"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"{tmp_path / 'counterfact' / 'train.json'}: cannot read file: missing" in out.stderr or \
        f"{tmp_path / 'counterfact' / 'valid.json'}: cannot read file: missing" in out.stderr
    assert "`python scripts/download_data.py counterfact` downloads CounterFact and splits it by subject" in out.stderr


def test_massive_script_end_to_end_and_resumable(tmp_path):
    """scripts/massive_counterfact.sh on tiny-llama: the split, one cell per (m, editor), the tables; a rerun keeps
    finished cells and continues a MALMEN cell from its checkpoint."""
    src, out, readme = write(tmp_path / "cf.json", rome_rows(40, subjects=30)), tmp_path / "run", tmp_path / "README.md"
    readme.write_text("# t\n<!-- table:massive_counterfact -->\n<!-- /table:massive_counterfact -->\n")
    env = script_env(DATA=src, N_TRAIN="24", N_VALID="8", M="2 4", LOCATED_M="2", EDITORS="malmen ft locft_bf",
                     STEPS="2", VALID_STEPS="1", OUT=str(out), README=str(readme), RESULTS=str(tmp_path / "data"))
    cmd = ["bash", "scripts/massive_counterfact.sh", "model=tiny-llama", f"cache_dir={tmp_path / 'cache'}"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = sorted(p.parent.name for p in (out / "results").glob("*/results.json"))
    assert cells == ["ft_m2_s0", "ft_m4_s0", "locft_bf_m2_s0", "malmen_m2_s0", "malmen_m4_s0"]
    assert json.loads((out / "split" / "split.json").read_text())["shared"]["subjects"] == 0
    table = readme.read_text()
    assert ("| m | editor | groups x seeds | ES | GS | LS | efficacy | paraphrase | neighborhood | ES_gen | GS_gen | LS_gen "
            "| unchanged | wall s | CPU s |"
            in table)
    assert table.count("| before editing | 1 x 1 |") == 2 and "| 4 | MALMEN | 1 x 1 |" in table
    assert (out / "results" / "massive_counterfact.md").is_file()
    assert (tmp_path / "data" / "massive_counterfact" / "summary.csv").is_file()  # README=: the table as data (RESULTS)
    # as if the session had ended during MALMEN's validation at m = 4: its checkpoint is there, its results not
    done = json.loads((out / "results" / "malmen_m4_s0" / "results.json").read_text())
    (out / "results" / "malmen_m4_s0" / "results.json").unlink()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("kept: ") == 4 and f"resuming: {out / 'results' / 'malmen_m4_s0'}" in again.stdout
    resumed = json.loads((out / "results" / "malmen_m4_s0" / "results.json").read_text())
    assert resumed["train"] == done["train"] and resumed["final"] == done["final"]  # nothing trained twice

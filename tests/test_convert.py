"""Conversion of the public releases (data/convert.py) and the download script, on ../shared/data."""
import json
import subprocess
import sys
from collections import Counter

import pytest

from data.convert import convert_fever, convert_zsre, dumps_records, fever2_pool, fever_claims, nq_pairs
from data.records import NQ_PREFIX, NQ_RULE, DataError, load_records
from scripts import download_data
from tests.helpers import (FEVER_DEV, NQ_OPEN, ROOT, ZSRE_1K, fever2_rows, kilt_row, read_shared, release_dir,
                           write_jsonl)


def test_zsre_sample_passes_through_every_record(shared_data, tmp_path):
    rows, path = read_shared(shared_data, ZSRE_1K)
    out, stats = convert_zsre(rows, path)
    assert len(rows) == 1000 and out == rows  # same records, same order: none lost, none duplicated
    assert stats["records"] == stats["written"] == 1000
    dest = tmp_path / "zsre.json"
    dest.write_text(dumps_records(out))
    records = load_records(str(dest), "zsre")
    assert [r.prompt for r in records] == [r["src"] for r in rows]
    assert all(r.answer.strip() and r.unrel_answer.strip() and r.subject for r in records)
    assert [r.unrel_prompt for r in records] == [r["loc"][len(NQ_PREFIX):] + "?" for r in rows]  # as the authors ran
    assert stats["unrel_prompt"] == NQ_RULE  # conversion.json says how the loader reads `loc`


def test_nq_open_pairs(shared_data):
    rows, path = read_shared(shared_data, NQ_OPEN)
    pairs = nq_pairs(rows, path)
    assert len(pairs) == len(rows) == 3610
    assert pairs == [(r["extra_info"]["question"], r["extra_info"]["answer"][0]) for r in rows]
    assert all(q.strip() and a.strip() for q, a in pairs)
    # the plain NQ-open release form {question, answer[]} reads the same
    plain = [{"question": r["extra_info"]["question"], "answer": r["extra_info"]["answer"]} for r in rows[:5]]
    assert nq_pairs(plain, "nq.jsonl") == pairs[:5]


def test_zsre_locality_pairs_drawn_from_nq(shared_data, tmp_path):
    rows, path = read_shared(shared_data, ZSRE_1K)
    nq = nq_pairs(*read_shared(shared_data, NQ_OPEN))
    out, stats = convert_zsre(rows, path, nq=nq, seed=3)
    assert stats["loc_from"] == "nq" and len(out) == 1000
    questions = {NQ_PREFIX + q: a for q, a in nq}
    assert all(questions[r["loc"]] == r["loc_ans"] for r in out)
    assert len({r["loc"] for r in out}) == 1000  # 1000 records < 3610 pairs: no pair used twice
    for a, b in zip(out, rows):  # only the locality pair changes
        assert {k: v for k, v in a.items() if k not in ("loc", "loc_ans")} == \
            {k: v for k, v in b.items() if k not in ("loc", "loc_ans")}
    assert rows[0]["loc"] != out[0]["loc"] or rows[1]["loc"] != out[1]["loc"]  # the input is not modified
    assert convert_zsre(rows, path, nq=nq, seed=3)[0] == out
    many, _ = convert_zsre(rows * 4, path, nq=nq, seed=0)  # 4000 records: each pair once or twice
    assert set(Counter(r["loc"] for r in many).values()) == {1, 2}


def test_fever_shared_dev_claims(shared_data, tmp_path):
    rows, path = read_shared(shared_data, FEVER_DEV)
    gold = {r["id"]: r["label"] for r in rows}
    claims, n_nei = fever_claims(rows, path)
    assert n_nei == 6666 and len(claims) == 13332  # NOT ENOUGH INFO has no binary label
    assert {c.id for c in claims} == {r["id"] for r in rows if r["label"] != "NOT ENOUGH INFO"}
    out, stats = convert_fever(claims, path, seed=0, missing_equiv="standin")
    assert stats == {"claims": 13332, "written": 13332, "equiv_rephrased": 0, "equiv_standin": 13332,
                     "dropped_no_rephrase": 0}
    assert len({r["id"] for r in out}) == 13332
    flip = {"SUPPORTS": "REFUTES", "REFUTES": "SUPPORTS"}
    for r in out:
        assert r["alt"] == flip[gold[r["id"]]]  # edit label: the opposite of the gold label
        assert r["unrel_ans"] == gold[r["unrel_id"]] and r["unrel_id"] != r["id"]
        assert r["unrel_prompt"] != r["prompt"]
        assert r["equiv_prompt"] == [r["prompt"]] and r["equiv_standin"] is True
    assert len({r["unrel_id"] for r in out}) > 13332 // 2  # drawn across the pool, not a few claims
    dest = tmp_path / "fever.json"
    dest.write_text(dumps_records(out))
    records = load_records(str(dest), "fever")
    assert len(records) == 13332
    assert [r.answer for r in records] == [gold[r["id"]] == "REFUTES" for r in out]
    assert convert_fever(claims, path, seed=0, missing_equiv="standin")[0] == out  # seeded
    assert convert_fever(claims, path, seed=1, missing_equiv="standin")[0] != out


def test_fever_kilt_with_and_without_rephrasings(shared_data):
    rows, _ = read_shared(shared_data, FEVER_DEV)
    binary = [r for r in rows if r["label"] != "NOT ENOUGH INFO"][:40]
    kilt = [kilt_row(r, filtered_rephrases=[f"Reportedly, {r['claim']}", f"It is said that {r['claim']}"])
            if i % 2 else kilt_row(r) for i, r in enumerate(binary)]
    claims, n_nei = fever_claims(kilt, "fever-dev-kilt.jsonl")
    assert n_nei == 0 and [c.text for c in claims] == [r["claim"] for r in binary]
    assert [c.label for c in claims] == [r["label"] == "SUPPORTS" for r in binary]
    with pytest.raises(DataError, match=r"fever-dev-kilt.jsonl: record 0: field 'filtered_rephrases'"):
        convert_fever(claims, "fever-dev-kilt.jsonl")  # default: no silent stand-ins
    standin, s1 = convert_fever(claims, "fever-dev-kilt.jsonl", missing_equiv="standin")
    dropped, s2 = convert_fever(claims, "fever-dev-kilt.jsonl", missing_equiv="drop")
    assert (s1["equiv_rephrased"], s1["equiv_standin"]) == (20, 20)
    assert (s2["written"], s2["dropped_no_rephrase"]) == (20, 20)
    for r, src in zip(standin, kilt):
        assert r["equiv_standin"] == ("filtered_rephrases" not in src)
        assert r["equiv_prompt"] == src.get("filtered_rephrases", [src["input"]])
    # dropping claims does not change the unrelated claims drawn for the others
    assert dropped == [r for r in standin if not r["equiv_standin"]]


def test_fever_bad_records_name_file_record_field(shared_data):
    rows, _ = read_shared(shared_data, FEVER_DEV)
    good = [kilt_row(r) for r in rows[2:5]]
    cases = [
        (good + [{"id": "x", "output": [{"answer": "SUPPORTS"}]}], "record 3: field 'claim'"),
        (good + [{"id": "x", "input": "A claim.", "output": [{"answer": "MAYBE"}]}], r"record 3: field 'output\[0\].answer'"),
        (good + [{"id": "x", "input": "A claim.", "output": [{"answer": "SUPPORTS"}, {"answer": "REFUTES"}]}],
         "record 3: field 'output'"),
        (good + [{"id": "x", "input": "  ", "output": [{"answer": "SUPPORTS"}]}], "record 3: field 'input'"),
        (good + [dict(good[0])], "record 3: field 'id': duplicate of record 0"),
        (good + [{**good[1], "id": "y", "filtered_rephrases": ["ok", ""]}], r"record 3: field 'filtered_rephrases\[1\]'"),
    ]
    for bad, match in cases:
        with pytest.raises(DataError, match=f"kilt.jsonl: {match}"):
            fever_claims(bad, "kilt.jsonl")


def test_zsre_bad_record_names_field(shared_data):
    rows, path = read_shared(shared_data, ZSRE_1K)
    bad = [dict(r) for r in rows[:10]]
    bad[7]["answers"] = [""]
    with pytest.raises(DataError, match=r"record 7: field 'answers\[0\]': empty"):
        convert_zsre(bad, path)
    with pytest.raises(DataError, match="record 2: field 'extra_info.answer'"):
        nq_pairs([{"extra_info": {"question": "q", "answer": ["a"]}}] * 2 + [{"extra_info": {"question": "q"}}], "nq")


def test_download_script_from_dir(shared_data, tmp_path, capsys):
    z, f = release_dir(shared_data, tmp_path / "release")
    out = tmp_path / "datasets"
    argv = ["--from-dir", str(tmp_path / "release"), "--out", str(out)]
    assert download_data.main(argv) == 0
    # the paths config/data/*.yaml read under data_dir=out
    assert json.loads((out / "zsre" / "zsre_mend_train.json").read_text()) == z[:800]
    assert json.loads((out / "zsre" / "zsre_mend_eval.json").read_text()) == z[800:]
    dev = load_records(str(out / "fever" / "fever_dev.json"), "fever")
    train = json.loads((out / "fever" / "fever_train.json").read_text())
    assert len(dev) == sum(r["label"] != "NOT ENOUGH INFO" for r in f[3000:4500])
    assert len(train) == sum(r["label"] != "NOT ENOUGH INFO" for r in f[:3000])
    # unrelated claims of both splits: FEVER 2.0 claims with their gold labels, never a training claim
    fever2 = {r["id"]: r for r in fever2_rows(60) if r["label"] != "NOT ENOUGH INFO"}
    dev_rows = json.loads((out / "fever" / "fever_dev.json").read_text())
    for r in train + dev_rows:
        assert (r["unrel_prompt"], r["unrel_ans"]) == (fever2[r["unrel_id"]]["claim"], fever2[r["unrel_id"]]["label"])
    assert len({r["unrel_id"] for r in dev_rows}) == 40  # drawn across the whole pool
    manifest = (out / "raw" / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split()[1] for line in manifest) == sorted(
        ["zsre_mend_train.json", "zsre_mend_eval.json", "fever-train-kilt.jsonl", "fever-dev-kilt.jsonl",
         "fever2-fixers-dev.jsonl"])
    report = json.loads((out / "fever" / "conversion.json").read_text())
    dev_report = report["files"][str(out / "fever" / "fever_dev.json")]
    assert dev_report["not_enough_info_excluded"] == sum(r["label"] == "NOT ENOUGH INFO" for r in f[3000:4500])
    assert report["unrel_source"] == dev_report["unrel_source"] == "fever2"
    assert dev_report["unrel_file"] == str(tmp_path / "release" / "fever2-fixers-dev.jsonl")
    assert (dev_report["unrel_claims"], dev_report["unrel_not_enough_info_excluded"]) == (40, 20)
    zsre_report = json.loads((out / "zsre" / "conversion.json").read_text())
    assert all(r["unrel_prompt"] == NQ_RULE for r in zsre_report["files"].values())
    # a second run verifies the recorded checksums; a changed file is refused
    capsys.readouterr()
    assert download_data.main(["zsre"] + argv) == 0
    assert "verified" in capsys.readouterr().out
    with open(tmp_path / "release" / "zsre_mend_eval.json", "a") as fh:
        fh.write(" ")
    assert download_data.main(["zsre"] + argv) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    # a missing file: what to download and where to put it
    (tmp_path / "release" / "fever-dev-kilt.jsonl").unlink()
    assert download_data.main(["fever"] + argv) == 1
    err = capsys.readouterr().err
    assert "http://dl.fbaipublicfiles.com/KILT/fever-dev-kilt.jsonl" in err
    assert str(tmp_path / "release" / "fever-dev-kilt.jsonl") in err


def test_unrel_source_train_flag_warns(shared_data, tmp_path, capsys):
    release_dir(shared_data, tmp_path / "release")
    (tmp_path / "release" / "fever2-fixers-dev.jsonl").unlink()  # not needed when drawing from train
    out = tmp_path / "datasets"
    argv = ["fever", "--from-dir", str(tmp_path / "release"), "--out", str(out), "--unrel-source", "train"]
    assert download_data.main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: --unrel-source train" in err and "not at the paper's 89.5" in err
    train = json.loads((out / "fever" / "fever_train.json").read_text())
    dev = json.loads((out / "fever" / "fever_dev.json").read_text())
    assert all(r["unrel_id"] in {t["id"] for t in train} for r in train + dev)
    assert json.loads((out / "fever" / "conversion.json").read_text())["unrel_source"] == "train"
    # without the flag the FEVER 2.0 file is required: what to download and where to put it
    assert download_data.main(argv[:-2]) == 1
    err = capsys.readouterr().err
    assert download_data.SOURCES["fever"]["fever2-fixers-dev.jsonl"] in err
    assert str(tmp_path / "release" / "fever2-fixers-dev.jsonl") in err


def test_fever2_pool_and_bad_records(tmp_path, capsys):
    rows = fever2_rows(9)
    edit = [fever_claims([{"id": "e", "claim": rows[1]["claim"], "label": "REFUTES"}], "train")[0][0]]
    pool, stats = fever2_pool(rows, "f2.jsonl", edit)  # a FEVER 2.0 claim that is also an edit claim: left out
    assert [c.text for c in pool] == [r["claim"] for r in rows if r["label"] != "NOT ENOUGH INFO" and r != rows[1]]
    assert stats == {"unrel_claims": 5, "unrel_not_enough_info_excluded": 3, "unrel_also_edit_claim_excluded": 1}
    cases = [
        ({"label": "MAYBE"}, "field 'label'"),
        ({"claim": ""}, "field 'claim'"),
        ({"id": None}, "field 'id'"),
        ({"id": 500000}, "field 'id': duplicate of record 0"),
    ]
    for change, match in cases:
        bad = [dict(r) for r in rows]
        bad[4].update(change)
        with pytest.raises(DataError, match=f"^f2.jsonl: record 4: {match}"):
            fever2_pool(bad, "f2.jsonl", edit)
    with pytest.raises(DataError, match="^f2.jsonl: no SUPPORTS/REFUTES claim"):
        fever2_pool(rows[2:3], "f2.jsonl", edit)
    # through the script: exit 2 and the message names file, record and field
    release = tmp_path / "release"
    release.mkdir()
    write_jsonl(release / "fever-train-kilt.jsonl",
                [{"id": "t", "input": "A claim.", "output": [{"answer": "SUPPORTS"}]}])
    write_jsonl(release / "fever-dev-kilt.jsonl", [{"id": "d", "input": "B claim.", "output": [{"answer": "REFUTES"}]}])
    bad = [dict(r) for r in rows]
    bad[4].pop("claim")
    write_jsonl(release / "fever2-fixers-dev.jsonl", bad)
    assert download_data.main(["fever", "--from-dir", str(release), "--out", str(tmp_path / "out")]) == 2
    assert f"{release / 'fever2-fixers-dev.jsonl'}: record 4: field 'claim'" in capsys.readouterr().err


def test_download_script_offline_message(tmp_path):
    # a mirror on a closed local port fails like a machine without network, and downloads nothing
    out = tmp_path / "datasets"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "download_data.py"), "--out", str(out),
                           "--mirror", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for name, url in {n: u for d in download_data.PAPER for n, u in download_data.SOURCES[d].items()}.items():
        assert url in proc.stderr and str(out / "raw" / name) in proc.stderr
    assert not (out / "zsre").exists() and not list((out / "raw").iterdir())

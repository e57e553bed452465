"""Tests for data/records.py: loading zsRE and FEVER record files, and the errors that name the record and field.

Collation and edit grouping: tests/test_data.py.
"""
from __future__ import annotations

import json

import pytest

from data.records import NQ_PREFIX, DataError, load_records
from tests.helpers import SHARED, ZSRE_1K, fever_dev_rows, need_shared, write_json


@pytest.fixture(scope="module")
def zsre_raw() -> list[dict]:
    return json.loads(need_shared(SHARED / ZSRE_1K).read_text())


# ---------------------------------------------------------------- records

def test_zsre_real_file(zsre_records, zsre_raw):
    assert len(zsre_records) == len(zsre_raw) == 1000
    for rec, raw in zip(zsre_records, zsre_raw):
        assert rec.answer == raw["answers"][0] and rec.answer.strip()
        assert rec.answer != raw["alt"] or raw["alt"] == raw["answers"][0]  # correct answer, not the alternative
        # the NQ question without its prefix, with the "?" the authors' runs append
        assert raw["loc"] == NQ_PREFIX + rec.unrel_prompt[:-1] and rec.unrel_answer == raw["loc_ans"]
        assert rec.unrel_prompt.endswith("?") and not rec.unrel_prompt.endswith("??")
        assert rec.prompt == raw["src"] and rec.equiv_prompts == (raw["rephrase"],)
        assert rec.subject == raw["subject"] and rec.subject


def test_zsre_paper_and_mend_formats_agree(tmp_path, zsre_raw):
    mend = zsre_raw[:50]
    # the paper's files hold the unrelated prompt in final form: no prefix, "?" already there
    paper = [{"src": r["src"], "rephrase": r["rephrase"], "ans": r["answers"][0],
              "loc": r["loc"][len(NQ_PREFIX):] + "?", "loc_ans": r["loc_ans"], "subject": r["subject"]} for r in mend]
    a = load_records(write_json(tmp_path / "mend.json", mend), "zsre")
    b = load_records(write_json(tmp_path / "paper.json", paper), "zsre")
    assert a == b and len(a) == 50


def test_zsre_nq_question_mark(tmp_path):
    rec = {"src": "Who made X?", "rephrase": "X was made by?", "ans": "Y", "loc_ans": "z"}
    locs = {"nq question: who wrote hamlet": "who wrote hamlet?",
            "nq question: is it raining?": "is it raining?",  # already asked: no "??"
            "nq question: where is paris  ": "where is paris?",
            "who wrote hamlet": "who wrote hamlet",  # paper format: final form, kept as it is
            "Who wrote Hamlet?": "Who wrote Hamlet?"}
    recs = load_records(write_json(tmp_path / "z.json", [{**rec, "loc": loc} for loc in locs]), "zsre")
    assert [r.unrel_prompt for r in recs] == list(locs.values())


def test_jsonl_same_as_json(tmp_path, zsre_raw):
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in zsre_raw[:20]) + "\n")
    assert load_records(str(tmp_path / "r.jsonl"), "zsre") == load_records(write_json(tmp_path / "r.json", zsre_raw[:20]), "zsre")


def test_fever_real_claims(tmp_path):
    raw = fever_dev_rows(200)
    recs = load_records(write_json(tmp_path / "fever.json", raw), "fever")
    assert len(recs) == 200
    assert [r.answer for r in recs] == [x["alt"] == "SUPPORTS" for x in raw]
    assert [r.unrel_answer for r in recs] == [x["unrel_ans"] == "SUPPORTS" for x in raw]
    assert {r.answer for r in recs} == {True, False}
    assert all(isinstance(r.answer, bool) and r.subject is None for r in recs)


@pytest.mark.parametrize("label,want", [(True, True), (False, False), (1, True), (0, False), ("supports", True),
                                        ("Refutes", False), ("TRUE", True), ("false", False), ("1", True), ("0", False)])
def test_fever_label_forms(tmp_path, label, want):
    raw = fever_dev_rows(1)
    raw[0]["alt"] = label
    assert load_records(write_json(tmp_path / "f.json", raw), "fever")[0].answer is want


@pytest.mark.parametrize("label", ["NOT ENOUGH INFO", 2, None, "yes", 1.5])
def test_fever_bad_label(tmp_path, label):
    raw = fever_dev_rows(5)
    raw[3]["unrel_ans"] = label
    path = write_json(tmp_path / "f.json", raw)
    with pytest.raises(DataError) as e:
        load_records(path, "fever")
    assert str(e.value).startswith(f"{path}: record 3: field 'unrel_ans': ")


def _mutate(raw: list[dict], index: int, how) -> list:
    raw = [dict(r) for r in raw]
    how(raw, index)
    return raw


@pytest.mark.parametrize("how,field", [
    (lambda r, i: r[i].pop("rephrase"), "rephrase"),
    (lambda r, i: r[i].update(answers=[""]), "answers[0]"),
    (lambda r, i: r[i].update(answers=[]), "answers"),
    (lambda r, i: r[i].update(src="   "), "src"),
    (lambda r, i: r[i].update(loc_ans=7), "loc_ans"),
    (lambda r, i: r[i].update(loc="nq question: "), "loc"),
    (lambda r, i: r[i].pop("answers"), "ans"),
    (lambda r, i: r.__setitem__(i, ["not", "an", "object"]), None),
])
def test_zsre_bad_record(tmp_path, zsre_raw, how, field):
    path = write_json(tmp_path / "bad.json", _mutate(zsre_raw[:30], 17, how))
    with pytest.raises(DataError) as e:
        load_records(path, "zsre")
    assert (e.value.path, e.value.index, e.value.field) == (path, 17, field)
    want = f"{path}: record 17: " + (f"field '{field}': " if field else "")
    assert str(e.value).startswith(want)


def test_paper_format_empty_answer(tmp_path):
    rec = {"src": "Q?", "rephrase": "Q again?", "ans": "", "loc": "other q", "loc_ans": "x"}
    path = write_json(tmp_path / "p.json", [rec])
    with pytest.raises(DataError, match=r"record 0: field 'ans': empty string"):
        load_records(path, "zsre")


def test_fever_empty_equiv_list(tmp_path):
    raw = fever_dev_rows(3)
    raw[2]["equiv_prompt"] = []
    path = write_json(tmp_path / "f.json", raw)
    with pytest.raises(DataError, match=r"record 2: field 'equiv_prompt': empty list"):
        load_records(path, "fever")


def test_unreadable_file(tmp_path):
    for path in (tmp_path / "missing.json", tmp_path):  # absent, and a directory
        with pytest.raises(DataError) as e:
            load_records(str(path), "zsre")
        assert str(e.value).startswith(f"{path}: cannot read file")


def test_malformed_jsonl_line(tmp_path, zsre_raw):
    lines = [json.dumps(r) for r in zsre_raw[:5]]
    lines[3] = lines[3][:-10]  # truncated object on line 4
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"^{path}: line 4: invalid JSON"):
        load_records(str(path), "zsre")


def test_malformed_json_list_line(tmp_path, zsre_raw):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(zsre_raw[:3], indent=1).replace('"src"', '"src', 1))
    line = 1 + path.read_text().split('"src', 1)[0].count("\n")
    with pytest.raises(DataError, match=rf"^{path}: line {line}: invalid JSON"):
        load_records(str(path), "zsre")

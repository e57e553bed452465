"""Reading a user's facts (JSON, JSONL, CSV): the same facts from each format, and every bad input."""
import json
import logging

import pytest

from data.collate import Collator
from data.facts import fact_group, read_facts, require_subjects
from data.records import DataError
from model.tiny import byte_tokenizer
from tests.helpers import MIXED_FACTS, write_facts


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_every_format_gives_the_same_facts(tmp_path, fmt):
    facts = read_facts(write_facts(tmp_path / f"facts.{fmt}", MIXED_FACTS, fmt))
    assert [f.prompt for f in facts] == [r["prompt"] for r in MIXED_FACTS]
    assert [f.answer for f in facts] == ["Fredville", "Wile E. Coyote", "Atlantis"]
    assert [f.equiv_prompts for f in facts] == [("Freedonia's capital is", "Freedonia is governed from"), (),
                                                ("Where is Mount Zog? In",)]
    assert [f.subject for f in facts] == ["Freedonia", None, None]
    assert [f.index for f in facts] == [0, 1, 2]


def test_group_has_every_fact_and_every_rephrasing(tmp_path):
    tok = byte_tokenizer("gpt2", 512)
    tok.pad_token = tok.eos_token
    facts = read_facts(write_facts(tmp_path / "f.json", MIXED_FACTS, "json"))
    group = fact_group(facts, 2, Collator(tok, "causal"), "f.json")
    assert [len(b["input_ids"]) for b in group.edit] == [2, 1]  # 3 facts in batches of 2
    assert [len(b["input_ids"]) for b in group.equiv] == [2, 1]  # 3 rephrasings in all
    assert group.unrel == [] and group.records == facts


def bad(tmp_path, rows, fmt="json"):
    return write_facts(tmp_path / f"bad.{fmt}", rows, fmt)


@pytest.mark.parametrize("row,match", [
    ({"answer": "x"}, "record 1: field 'prompt': missing"),
    ({"prompt": "p"}, "record 1: field 'answer': missing"),
    ({"prompt": "   ", "answer": "x"}, "record 1: field 'prompt': only whitespace \\('   '\\)"),
    ({"prompt": "p", "answer": ""}, "record 1: field 'answer': empty string"),
    ({"prompt": "p", "answer": "x", "rephrases": ["ok", " "]}, "record 1: field 'rephrases\\[1\\]': only whitespace"),
    ({"prompt": "p", "answer": "x", "rephrases": "one string"}, "record 1: field 'rephrases': expected a list"),
    ({"prompt": "p", "answer": 3}, "record 1: field 'answer': expected a string, got int"),
    ("just text", "record 1: not a JSON object"),
])
def test_bad_fact_names_file_record_and_field(tmp_path, row, match):
    path = bad(tmp_path, [MIXED_FACTS[0], row])
    with pytest.raises(DataError, match=match) as err:
        read_facts(path)
    assert err.value.path == path


def test_missing_unreadable_empty_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        read_facts(str(tmp_path / "nope.json"))
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl: cannot read file"):
        read_facts(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json: contains no facts"):
        read_facts(str(tmp_path / "empty.json"))
    (tmp_path / "facts.txt").write_text("p,a\n")
    with pytest.raises(DataError, match="unknown facts format '.txt'"):
        read_facts(str(tmp_path / "facts.txt"))
    (tmp_path / "one.json").write_text(json.dumps(MIXED_FACTS[0], indent=2))
    with pytest.raises(DataError, match="one.json: holds one JSON object; expected a list"):
        read_facts(str(tmp_path / "one.json"))


def test_malformed_jsonl_line_is_named(tmp_path):
    lines = [json.dumps(MIXED_FACTS[0]), json.dumps(MIXED_FACTS[1]), '{"prompt": "p", "answer": ',
             json.dumps(MIXED_FACTS[2])]
    (tmp_path / "f.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match="f.jsonl: line 3: invalid JSON"):
        read_facts(str(tmp_path / "f.jsonl"))


def test_bad_csv(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,rephrases\np,q\n")
    with pytest.raises(DataError, match="a.csv: field 'answer': missing column"):
        read_facts(str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("prompt,answer\np,a\nq,b,extra\n")
    with pytest.raises(DataError, match="b.csv: record 1: line 3: more values than columns"):
        read_facts(str(tmp_path / "b.csv"))
    (tmp_path / "c.csv").write_text("prompt,answer\np,a\nq\n")  # a short row: its answer is missing
    with pytest.raises(DataError, match="c.csv: record 1: field 'answer': missing"):
        read_facts(str(tmp_path / "c.csv"))
    (tmp_path / "d.csv").write_text("prompt,answer,rephrases\np,a,r1||r3\n")
    with pytest.raises(DataError, match="d.csv: record 0: field 'rephrases\\[1\\]': empty after splitting the cell "
                                        "'r1\\|\\|r3'"):
        read_facts(str(tmp_path / "d.csv"))


def test_duplicates_are_kept_with_a_warning(tmp_path, caplog):
    rows = [MIXED_FACTS[0], MIXED_FACTS[1],
            {"prompt": MIXED_FACTS[0]["prompt"] + " ", "answer": MIXED_FACTS[0]["answer"]}]
    with caplog.at_level(logging.WARNING, logger="data.facts"):
        facts = read_facts(bad(tmp_path, rows))
    assert len(facts) == 3
    assert "records 0 and 2 are the same fact" in caplog.text


def test_conflicting_answers_are_refused_naming_both_records(tmp_path):
    rows = [MIXED_FACTS[0], MIXED_FACTS[1], {"prompt": MIXED_FACTS[1]["prompt"], "answer": "Road Runner"}]
    with pytest.raises(DataError, match="record 2: field 'answer': conflicts with record 1") as err:
        read_facts(bad(tmp_path, rows))
    assert "'Wile E. Coyote' there and 'Road Runner' here" in str(err.value)


def test_unknown_fields_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="data.facts"):
        read_facts(bad(tmp_path, [{"prompt": "p", "answer": "a", "rephrase": ["typo"]}]))
    assert "record 0: ignoring unknown fields ['rephrase']" in caplog.text


def test_classifier_answers_are_labels(tmp_path):
    facts = read_facts(bad(tmp_path, [{"prompt": "Claim one.", "answer": "SUPPORTS"},
                                      {"prompt": "Claim two.", "answer": False}]), labels=True)
    assert [f.answer for f in facts] == [True, False]
    with pytest.raises(DataError, match="record 0: field 'answer': not a binary label"):
        read_facts(bad(tmp_path, [{"prompt": "Claim.", "answer": "maybe"}]), labels=True)


def test_too_long_is_refused_not_truncated(tmp_path):
    tok = byte_tokenizer("gpt2", 64)
    tok.pad_token = tok.eos_token
    rows = [MIXED_FACTS[1], {"prompt": "p", "answer": "a", "rephrases": ["ok", "word " * 20]}]
    facts = read_facts(bad(tmp_path, rows))
    with pytest.raises(DataError, match="record 1: field 'rephrases\\[1\\]': .*longer than the tokenizer limit 64"
                                        ".*refused, never truncated"):
        fact_group(facts, 4, Collator(tok, "causal"), "bad.json")


def test_memit_needs_subjects(tmp_path):
    facts = read_facts(bad(tmp_path, MIXED_FACTS))
    with pytest.raises(DataError, match="record 1: field 'subject': missing: editor memit edits at the last token"):
        require_subjects(facts, "bad.json", "memit")

"""A user's own facts to edit into a model: JSON, JSONL or CSV, validated into EditRecords.

One fact is {prompt, answer, rephrases (optional), subject (optional)}:
  JSON   a list of objects;          JSONL  one object per line;
  CSV    a header row prompt,answer[,rephrases][,subject]; rephrases separated by `|` (a warning says
         which cells were split), `\\|` for a literal `|` inside one rephrasing.
Facts carry no unrelated (locality) tuple: their EditRecords have empty `unrel_*` fields, and
`fact_group` builds no unrelated batches, so nothing reads them. Every problem is one DataError
naming the file, the record (0-based, in file order; CSV record i is on line i + 2) and the field.
Reading and checking a file needs no torch (main.py does it before the heavy imports); `fact_group`,
which tokenises, imports data.groups when called.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.records import DataError, EditRecord, _Fields, read_objects
from data.subjects import requests

if TYPE_CHECKING:  # data.collate and data.groups import torch; reading facts (main.py's checks) must not
    from data.collate import Collator
    from data.groups import EditGroup

FIELDS = ("prompt", "answer", "rephrases", "subject")
SUFFIXES = (".json", ".jsonl", ".csv")
CSV_SEP = "|"  # separates the rephrasings inside one CSV cell
CSV_ESCAPE = "\\|"  # a literal | inside one rephrasing
log = logging.getLogger(__name__)


def read_facts(path: str, labels: bool = False) -> list[EditRecord]:
    """Facts of a .json, .jsonl or .csv file as EditRecords; `labels`: answers are binary (FEVER classifier)."""
    file = Path(path)
    if file.suffix.lower() not in SUFFIXES:
        raise DataError(path, None, None, f"unknown facts format {file.suffix!r}: use {', '.join(SUFFIXES)}")
    if not file.is_file():
        raise FileNotFoundError(f"facts file {path} does not exist (edit.facts)")
    rows = _csv_rows(path) if file.suffix.lower() == ".csv" else _json_rows(path)
    if not rows:
        raise DataError(path, None, None, "contains no facts")
    facts = [parse_fact(raw, path, i, labels) for i, raw in enumerate(rows)]
    check_consistent(facts, path)
    return facts


def parse_fact(raw: Any, path: str, index: int, labels: bool = False) -> EditRecord:
    """One raw fact as an EditRecord (no unrelated tuple); DataError naming `path`, `index`, field."""
    if not isinstance(raw, dict):
        raise DataError(path, index, None, f"not a JSON object (got {type(raw).__name__})")
    f = _Fields(path, index, raw)
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:  # ignored, but said: a typo such as "rephrase" would otherwise vanish silently
        log.warning("%s: record %d: ignoring unknown fields %s (known: %s)", path, index, unknown, ", ".join(FIELDS))
    rephrases = raw.get("rephrases")
    if rephrases is None or rephrases == []:
        rephrases = ()
    elif isinstance(rephrases, list):
        rephrases = tuple(f.text("rephrases", r, name=f"rephrases[{j}]") for j, r in enumerate(rephrases))
    else:
        raise f.error("rephrases", f"expected a list of strings, got {type(rephrases).__name__}")
    subject = raw.get("subject")
    return EditRecord(
        prompt=f.text("prompt"),
        answer=f.label("answer") if labels else f.text("answer"),
        equiv_prompts=rephrases,
        unrel_prompt="", unrel_answer="",  # user facts have no locality tuple
        subject=None if subject is None else f.text("subject"),
        index=index,
    )


def _json_rows(path: str) -> list[Any]:
    """A JSON list, or JSONL; a file holding one JSON object (not a list) is named as such."""
    try:
        return read_objects(path)
    except DataError:
        try:
            whole = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, OSError):
            whole = None
        if isinstance(whole, dict):  # read as JSONL, a pretty-printed object fails on its first line
            raise DataError(path, None, None, "holds one JSON object; expected a list of fact objects "
                            "[{\"prompt\": ..., \"answer\": ...}, ...] or JSONL (one object per line)") from None
        raise


def _csv_rows(path: str) -> list[dict]:
    """CSV data rows as dicts (UTF-8, with or without the byte-order mark spreadsheets write); `rephrases`
    split on `|`; ragged rows refused with their line number."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            for column in ("prompt", "answer"):
                if column not in header:
                    raise DataError(path, None, column, f"missing column: the header must name "
                                    f"prompt,answer[,rephrases][,subject] (got {header})")
            rows, split = [], {}
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataError(path, len(rows), None, f"line {reader.line_num}: more values than columns")
                raw = {k: v for k, v in row.items() if v is not None}  # fewer cells: those fields missing
                if raw.get("rephrases") is not None:
                    raw["rephrases"] = split_cell(raw["rephrases"], path, len(rows))
                    if len(raw["rephrases"]) > 1:
                        split[len(rows)] = raw["rephrases"]
                if raw.get("subject") == "":
                    del raw["subject"]  # an empty optional cell means "no subject"
                rows.append(raw)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, None, f"cannot read file ({e})") from e
    except csv.Error as e:
        raise DataError(path, None, None, f"line {reader.line_num}: malformed CSV ({e})") from e
    if split:  # said, because a | meant as text would otherwise become a rephrasing silently
        first, pieces = next(iter(split.items()))
        log.warning("%s: the rephrases cell of %d record(s) (%s) was split on %r into several rephrasings, "
                    "e.g. record %d: %s; write %s for a literal %r inside one rephrasing", path, len(split),
                    ", ".join(map(str, list(split)[:10])) + (", ..." if len(split) > 10 else ""), CSV_SEP,
                    first, " | ".join(map(repr, pieces)), CSV_ESCAPE, CSV_SEP)
    return rows


def split_cell(cell: str, path: str, index: int) -> list[str]:
    """The rephrasings of one CSV cell: split on `|`, with `\\|` a literal `|`; an empty piece is refused."""
    if not cell.strip():
        return []
    pieces = [p.replace(CSV_ESCAPE, CSV_SEP) for p in re.split(r"(?<!\\)\|", cell)]
    for j, piece in enumerate(pieces):
        if not piece.strip():
            raise DataError(path, index, f"rephrases[{j}]", f"empty after splitting the cell {cell!r} on "
                            f"{CSV_SEP!r} into {len(pieces)} rephrasings; write {CSV_ESCAPE} for a literal {CSV_SEP!r}")
    return pieces


def check_consistent(facts: list[EditRecord], path: str) -> None:
    """Warn on duplicated facts (kept); refuse two answers for the same prompt, naming both records."""
    first: dict[str, EditRecord] = {}
    for fact in facts:
        key = " ".join(fact.prompt.split())  # the same prompt up to whitespace
        seen = first.setdefault(key, fact)
        if seen is fact:
            continue
        if seen.answer != fact.answer:
            raise DataError(path, fact.index, "answer", f"conflicts with record {seen.index}: the prompt "
                            f"{fact.prompt!r} has answer {seen.answer!r} there and {fact.answer!r} here; "
                            "a model cannot give both, so remove one")
        log.warning("%s: records %d and %d are the same fact (%r -> %r); both are kept", path, seen.index,
                    fact.index, fact.prompt, fact.answer)


def require_subjects(facts: list[EditRecord], path: str, editor: str) -> None:
    """MEMIT and EMMET edit at the subject's last token: every fact needs a `subject` field that occurs in
    its prompt; DataError naming the file, the fact and the field otherwise (before the model loads)."""
    for fact in facts:
        if fact.subject is None:
            raise DataError(path, fact.index, "subject", f"missing: editor {editor} edits at the last token of "
                            "the subject, so every fact needs a 'subject' (a part of its prompt, e.g. "
                            "\"Paris\" in \"Paris is the capital of\"); or use editor=malmen, mend, ft or locft_bf")
    requests(facts, path, editor)  # each subject found in its prompt, as the editor will look for it


def fact_group(facts: list[EditRecord], batch_size: int, collator: Collator, path: str) -> EditGroup:
    """All facts as one EditGroup: edit batches, and batches of every (rephrase, answer); no unrelated ones."""
    from data.groups import EditGroup  # torch: imported only when the facts are tokenised
    if batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
    for fact in facts:  # tokenise each tuple alone first, so an error names its record and field
        _check_tuple(collator, fact.prompt, fact.answer, path, fact.index, "prompt")
        for j, text in enumerate(fact.equiv_prompts):
            _check_tuple(collator, text, fact.answer, path, fact.index, f"rephrases[{j}]")
    equiv = [(text, f.answer) for f in facts for text in f.equiv_prompts]
    return EditGroup(records=facts, edit=_batches(collator, [(f.prompt, f.answer) for f in facts], batch_size),
                     equiv=_batches(collator, equiv, batch_size), unrel=[], path=path)


def _check_tuple(collator: Collator, prompt: str, answer, path: str, index: int, field: str) -> None:
    """Tokenise one (prompt, answer); a failure names the field it comes from (`field` or "answer")."""
    try:
        collator([prompt], [answer])
    except ValueError as err:  # too long for the model, unknown words, or no tokens
        name = "answer" if getattr(err, "part", None) == "answer" else field
        raise DataError(path, index, name, f"{err} (facts longer than the model's context are refused, "
                        "never truncated)" if "longer than" in str(err) else str(err)) from err


def _batches(collator: Collator, pairs: list[tuple], batch_size: int) -> list[dict]:
    return [collator([p for p, _ in pairs[i: i + batch_size]], [a for _, a in pairs[i: i + batch_size]])
            for i in range(0, len(pairs), batch_size)]

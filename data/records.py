"""Edit records: loading and validating zsRE and FEVER files into one common form.

zsRE unrelated prompt: a `loc` carrying the NQ prefix ("nq question: ", the MEND/MEMIT release) is the
NQ question with the prefix removed and "?" appended, as the authors ran them (NQ questions carry no
question mark). A `loc` without the prefix (the paper's own files, the synthetic world) was written in
final form and is kept as it is.

CounterFact (Meng et al. 2022, ROME) comes in two forms, told apart per record:
  flat (the MEND/EasyEdit split): {prompt, subject, target_new, ground_truth, rephrase_prompt,
        locality_prompt, locality_ground_truth};
  ROME's counterfact.json: {requested_rewrite: {prompt (a template with one "{}" for the subject),
        subject, target_new: {str}, target_true: {str}}, paraphrase_prompts[], neighborhood_prompts[]}.
Edit tuple = (prompt, target_new); equivalent = the rephrasing(s), one drawn per edit (data.groups);
unrelated = (the neighborhood/locality prompt, its own true answer: locality_ground_truth, or ROME's
target_true, which every neighborhood prompt of a record shares). ROME's form gives ten neighborhood
prompts: the first is the unrelated tuple (one per edit, as in the flat split, whose locality_prompt is
one of them); the others, and `attribute_prompts` / `generation_prompts`, are not read. `true_answer`
keeps ground_truth / target_true for CounterFact's own scores (model/lm.counterfact_scores).

Every text field loses its surrounding whitespace at load (a prompt's trailing space would otherwise
put two spaces before the answer); a field that is only whitespace is refused by name.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

NQ_PREFIX = "nq question: "
# how data.records reads a zsRE `loc` (conversion reports quote it)
NQ_RULE = f"the NQ question: loc without its {NQ_PREFIX!r} prefix, with '?' appended (data.records, at load)"
FORMATS = ("zsre", "fever", "counterfact")
_TRUE = {"supports", "true", "1"}
_FALSE = {"refutes", "false", "0"}
_UNSET = object()
log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (data files, facts, checkpoints, the GGUF)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



class DataError(ValueError):
    """Bad input data: names the file, the record index and the field."""

    def __init__(self, path: str, index: int | None, field: str | None, msg: str):
        self.path, self.index, self.field, self.msg = path, index, field, msg
        parts = [str(path)]
        if index is not None:
            parts.append(f"record {index}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(": ".join(parts + [msg]))


@dataclass(frozen=True)
class EditRecord:
    """One edit: the edit tuple, its equivalent prompts and one unrelated tuple."""

    prompt: str
    answer: str | bool  # str for QA (zsRE); bool for FEVER (True = SUPPORTS)
    equiv_prompts: tuple[str, ...]  # >= 1 semantically equivalent prompts; same answer
    unrel_prompt: str
    unrel_answer: str | bool
    subject: str | None = None  # zsRE MEND format and CounterFact carry it (needed later by MEMIT)
    true_answer: str | None = None  # CounterFact: the fact before the edit (ground_truth / target_true)
    index: int | None = field(default=None, compare=False)  # position in its file, for error messages


def load_records(path: str, fmt: str) -> list[EditRecord]:
    """Load a JSON list or JSONL file of `fmt` ("zsre", "fever" or "counterfact") records; DataError on any
    bad record."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    require_file(path)
    rows = read_objects(path)
    records = [parse_record(raw, fmt, path, i) for i, raw in enumerate(rows)]
    if not records:
        raise DataError(path, None, None, "contains no records")
    standins = sum(1 for raw in rows if raw.get("equiv_standin") is True)
    if standins:  # written by data.convert when no rephrasings were available
        log.warning("%s: %d of %d records use the claim itself as its equivalent prompt (stand-in, no "
                    "rephrasing): GS on them measures ES, not generalisation", path, standins, len(rows))
    return records


def require_file(path: str, why: str = "") -> None:
    """DataError naming `path`, `why` the run reads it (if given) and how to get the paper's data when it
    does not exist (main.py checks this before the heavy imports; load_records again)."""
    if not Path(path).exists():  # most often the paper's data, not downloaded yet
        where = "" if Path(path).is_absolute() else f" (looked for {Path(path).resolve()})"
        why = f" ({why})" if why else ""
        how = ("`python scripts/download_data.py counterfact` downloads CounterFact and splits it by subject"
               if "counterfact" in str(path).lower() else
               "`python scripts/download_data.py` downloads the paper's zsRE and FEVER splits")
        raise DataError(path, None, None, f"cannot read file: missing{where}{why}; {how}")


def parse_record(raw: Any, fmt: str, path: str, index: int) -> EditRecord:
    """One raw record of `fmt` as an EditRecord; DataError naming `path`, `index` and the field."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(raw, dict):
        raise DataError(path, index, None, f"not a JSON object (got {type(raw).__name__})")
    parse = {"zsre": _zsre, "fever": _fever, "counterfact": _counterfact}[fmt]
    return replace(parse(_Fields(path, index, raw)), index=index)


def read_objects(path: str) -> list[Any]:
    """Parse the file as one JSON list, or as JSONL when it does not start with '['."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, None, f"cannot read file ({e})") from e
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"line {e.lineno}: invalid JSON ({e.msg})") from e
        return data
    objects = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no record
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"line {lineno}: invalid JSON ({e.msg})") from e
    return objects


class _Fields:
    """Typed access to one raw record; every failure is a DataError naming file, index and field."""

    def __init__(self, path: str, index: int, raw: dict, prefix: str = ""):
        self.path, self.index, self.raw, self.prefix = path, index, raw, prefix  # prefix: a nested object's path

    def error(self, field: str, msg: str) -> DataError:
        return DataError(self.path, self.index, self.prefix + field, msg)

    def nested(self, field: str) -> "_Fields":
        """The object in `field`, its fields named `field.name` in errors."""
        value = self.get(field)
        if not isinstance(value, dict):
            raise self.error(field, f"expected an object, got {type(value).__name__}")
        return _Fields(self.path, self.index, value, f"{self.prefix}{field}.")

    def get(self, field: str) -> Any:
        if field not in self.raw:
            raise self.error(field, "missing")
        return self.raw[field]

    def text(self, field: str, value: Any = _UNSET, *, name: str | None = None) -> str:
        """A non-empty string without surrounding whitespace (prompt and answer are joined by exactly
        one space later); `value`/`name` check an element of a list field."""
        name = name or field
        value = self.get(field) if value is _UNSET else value
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise self.error(name, "empty string" if not value else f"only whitespace ({value!r})")
        return value.strip()

    def texts(self, field: str) -> tuple[str, ...]:
        """A non-empty list of non-empty strings."""
        value = self.get(field)
        if not isinstance(value, list):
            raise self.error(field, f"expected a list of strings, got {type(value).__name__}")
        if not value:
            raise self.error(field, "empty list")
        return tuple(self.text(field, v, name=f"{field}[{j}]") for j, v in enumerate(value))

    def label(self, field: str) -> bool:
        """A binary label: bool, 0/1, or SUPPORTS/REFUTES/true/false/1/0 (any case)."""
        value = self.get(field)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise self.error(field, f"not a binary label: {value!r} (expected SUPPORTS/REFUTES, true/false or 0/1)")


def _zsre(f: _Fields) -> EditRecord:
    """zsRE record in the paper format {src, rephrase, ans, loc, loc_ans} or the MEND format (answers list).

    unrel_prompt: "nq question: Q" -> "Q?" (no "?" doubled); a loc without the prefix unchanged.
    """
    if "answers" in f.raw:
        answer = f.texts("answers")[0]  # the correct answer; the paper does not edit towards `alt`
    elif "ans" in f.raw:
        answer = f.text("ans")
    else:
        raise f.error("ans", "missing (need 'ans' (paper format) or 'answers' (MEND format))")
    loc = f.text("loc")
    if loc.startswith(NQ_PREFIX.rstrip()):  # see the module docstring: the authors' form of the NQ prompt
        loc = loc[len(NQ_PREFIX.rstrip()):].strip()  # (`loc` lost its trailing space with the prefix's)
        if not loc:
            raise f.error("loc", f"empty question after the {NQ_PREFIX!r} prefix")
        loc = loc if loc.endswith("?") else loc + "?"
    subject = f.raw.get("subject")
    if subject is not None:
        subject = f.text("subject")
    return EditRecord(
        prompt=f.text("src"),
        answer=answer,
        equiv_prompts=(f.text("rephrase"),),
        unrel_prompt=loc,
        unrel_answer=f.text("loc_ans"),
        subject=subject,
    )


def _fever(f: _Fields) -> EditRecord:
    """FEVER record in the paper format {prompt, equiv_prompt[], unrel_prompt, alt, unrel_ans}."""
    # `alt` is already the edit target (the flipped label) in the paper's files: no flip here
    return EditRecord(
        prompt=f.text("prompt"),
        answer=f.label("alt"),
        equiv_prompts=f.texts("equiv_prompt"),
        unrel_prompt=f.text("unrel_prompt"),
        unrel_answer=f.label("unrel_ans"),
    )


def _counterfact(f: _Fields) -> EditRecord:
    """CounterFact record, flat (MEND/EasyEdit) or ROME's nested form (module docstring); refused when the
    new answer is the true one (its scores compare the two)."""
    record = _counterfact_fields(f)
    if record.answer == record.true_answer:
        raise f.error("target_new", f"is the true answer ({record.answer!r}): the edit would change nothing")
    return record


def _counterfact_fields(f: _Fields) -> EditRecord:
    if "requested_rewrite" not in f.raw:
        return EditRecord(
            prompt=f.text("prompt"),
            answer=f.text("target_new"),
            equiv_prompts=(f.text("rephrase_prompt"),),
            unrel_prompt=f.text("locality_prompt"),
            unrel_answer=f.text("locality_ground_truth"),
            subject=f.text("subject"),
            true_answer=f.text("ground_truth"),
        )
    r = f.nested("requested_rewrite")
    subject, template = r.text("subject"), r.text("prompt")
    if template.count("{}") != 1:
        raise r.error("prompt", f"expected one '{{}}' where the subject goes, got {template!r}")
    true = r.nested("target_true").text("str")
    return EditRecord(
        prompt=template.replace("{}", subject),
        answer=r.nested("target_new").text("str"),
        equiv_prompts=f.texts("paraphrase_prompts"),
        unrel_prompt=f.texts("neighborhood_prompts")[0],  # every one is checked; the first is used
        unrel_answer=true,
        subject=subject,
        true_answer=true,
    )

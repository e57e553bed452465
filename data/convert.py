"""Public releases -> the files data=zsre and data=fever read. Pure functions: no network, no files.

zsRE: the MEND/MEMIT release ({subject, src, rephrase, answers[], alt, loc, loc_ans}) is already a
format data.records reads, so conversion validates every record and passes it through unchanged
(subject and alt stay for MEMIT-style editors). Its `loc`/`loc_ans` are the NQ locality pairs;
`nq` optionally draws them from an NQ-open file instead.

FEVER: KILT ({id, input, output: [{answer}]}; De Cao et al.'s augmented KILT files add
`filtered_rephrases`), the original FEVER release and the shared-task dev dump ({id, claim, label})
become the paper's {prompt, equiv_prompt[], unrel_prompt, alt, unrel_ans} records. `alt` is the
opposite of the gold label (the paper edits against the fine-tuning labels); the unrelated claim is
a FEVER 2.0 claim (`fever2_pool`: the adversarial claims, never seen when fine-tuning the classifier)
with its gold label, as the authors ran them. NOT ENOUGH INFO claims have no binary label: excluded,
counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from data.records import NQ_PREFIX, NQ_RULE, DataError, parse_record

SUPPORTS, REFUTES, NEI = "SUPPORTS", "REFUTES", "NOT ENOUGH INFO"
REPHRASE_FIELD = "filtered_rephrases"  # De Cao et al.'s augmented KILT files
MISSING_EQUIV = ("error", "standin", "drop")  # what to do with a claim that has no rephrasing
_MAX_DRAWS = 1000  # rejection sampling of an unrelated claim; far more than a real pool needs


@dataclass(frozen=True)
class Claim:
    """One FEVER claim with a binary gold label and the rephrasings that came with it (maybe none)."""

    id: str | int
    text: str
    label: bool  # gold label: True = SUPPORTS
    rephrases: tuple[str, ...]
    index: int  # position in its file, for error messages


def convert_zsre(rows: Sequence[Any], path: str, nq: Sequence[tuple[str, str]] | None = None,
                 seed: int = 0) -> tuple[list[dict], dict]:
    """Validated zsRE records (unchanged, or with `loc`/`loc_ans` drawn from `nq`) and counts."""
    if not rows:
        raise DataError(path, None, None, "contains no records")
    out = [dict(raw) if isinstance(raw, dict) else raw for raw in rows]
    if nq is not None:
        if not nq:
            raise ValueError("nq: no question-answer pairs to draw locality tuples from")
        # balanced draw: every NQ pair is used floor or ceil of len(rows) / len(nq) times
        rng = np.random.default_rng(seed)
        rounds = -(-len(out) // len(nq))
        order = np.concatenate([rng.permutation(len(nq)) for _ in range(rounds)])[: len(out)]
        for row, k in zip(out, order.tolist()):
            if isinstance(row, dict):
                row["loc"], row["loc_ans"] = NQ_PREFIX + nq[k][0], nq[k][1]
    for i, raw in enumerate(out):
        parse_record(raw, "zsre", path, i)  # every field of every record, as data=zsre will read it
    pairs = [(r["src"], r["answers"][0] if "answers" in r else r["ans"]) for r in out]
    stats = {"records": len(rows), "written": len(out), "loc_from": "nq" if nq is not None else "records",
             "unrel_prompt": NQ_RULE, "repeated_src_answer": len(pairs) - len(set(pairs))}
    return out, stats


def nq_pairs(rows: Sequence[Any], path: str) -> list[tuple[str, str]]:
    """(question, first answer) of NQ-open rows: {question, answer[]} or {extra_info: {question, answer[]}}."""
    pairs = []
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise DataError(path, i, None, f"not a JSON object (got {type(raw).__name__})")
        src, prefix = (raw["extra_info"], "extra_info.") if isinstance(raw.get("extra_info"), dict) else (raw, "")
        question = _text(src.get("question"), path, i, prefix + "question")
        answers = src.get("answer")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers:
            raise DataError(path, i, prefix + "answer", f"expected a non-empty list of strings, got {answers!r}")
        pairs.append((question, _text(answers[0], path, i, prefix + "answer[0]")))
    if not pairs:
        raise DataError(path, None, None, "contains no records")
    return pairs


def fever_claims(rows: Sequence[Any], path: str) -> tuple[list[Claim], int]:
    """The SUPPORTS/REFUTES claims of KILT, FEVER or shared-dev rows, and how many NOT ENOUGH INFO were left out."""
    claims, n_nei, seen = [], 0, {}
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise DataError(path, i, None, f"not a JSON object (got {type(raw).__name__})")
        if "input" in raw:  # KILT
            text, label = _text(raw["input"], path, i, "input"), _kilt_label(raw, path, i)
        elif "claim" in raw:  # FEVER release / shared-task dev dump
            text, label = _text(raw["claim"], path, i, "claim"), _label(raw.get("label"), path, i, "label")
        else:
            raise DataError(path, i, "claim", "missing (need 'claim' (FEVER) or 'input' (KILT))")
        cid = raw.get("id")
        if not isinstance(cid, (str, int)) or isinstance(cid, bool) or cid == "":
            raise DataError(path, i, "id", f"expected a non-empty string or an integer, got {cid!r}")
        if cid in seen:
            raise DataError(path, i, "id", f"duplicate of record {seen[cid]} (id {cid!r})")
        seen[cid] = i
        rephrases = _rephrases(raw, path, i)  # checked on every record, NOT ENOUGH INFO ones too
        if label is None:
            n_nei += 1
            continue
        claims.append(Claim(id=cid, text=text, label=label, rephrases=rephrases, index=i))
    if not rows:
        raise DataError(path, None, None, "contains no records")
    return claims, n_nei


def fever2_pool(rows: Sequence[Any], path: str, edit_claims: Sequence[Claim]) -> tuple[list[Claim], dict]:
    """The SUPPORTS/REFUTES claims of a FEVER 2.0 file, to draw unrelated claims from, and counts.

    A claim whose text is also one of `edit_claims` is left out (FEVER 2.0 claims are meant to be new;
    one the classifier was fine-tuned on would not measure locality), counted.
    """
    claims, n_nei = fever_claims(rows, path)
    edit_texts = {c.text for c in edit_claims}
    pool = [c for c in claims if c.text not in edit_texts]
    if not pool:
        raise DataError(path, None, None, "no SUPPORTS/REFUTES claim to draw unrelated claims from")
    return pool, {"unrel_claims": len(pool), "unrel_not_enough_info_excluded": n_nei,
                  "unrel_also_edit_claim_excluded": len(claims) - len(pool)}


def convert_fever(claims: Sequence[Claim], path: str, *, seed: int = 0,
                  unrel_pool: Sequence[Claim] | None = None,
                  missing_equiv: str = "error") -> tuple[list[dict], dict]:
    """The paper's FEVER records (edit label = opposite of gold) from `claims`, and counts.

    Each record gets one unrelated claim drawn (seeded) from `unrel_pool` (default: `claims`), never
    one with its own id or text, labelled with its gold label. A claim without rephrasings is, by
    `missing_equiv`: "error" (DataError), "standin" (the claim itself, flagged equiv_standin: true),
    or "drop" (left out, counted).
    """
    if missing_equiv not in MISSING_EQUIV:
        raise ValueError(f"missing_equiv must be one of {MISSING_EQUIV}, got {missing_equiv!r}")
    pool = list(claims if unrel_pool is None else unrel_pool)
    rng = np.random.default_rng(seed)
    out, n_standin, n_dropped = [], 0, 0
    for c in claims:
        u = _unrelated(c, pool, rng, path)  # drawn for every claim: the draw does not depend on missing_equiv
        if c.rephrases:
            equiv = list(c.rephrases)
        elif missing_equiv == "error":
            raise DataError(path, c.index, REPHRASE_FIELD,
                            "no rephrasing of the claim (De Cao et al.'s augmented KILT files carry them); "
                            "use missing_equiv='standin' (the claim itself, flagged) or 'drop'")
        elif missing_equiv == "drop":
            n_dropped += 1
            continue
        else:
            equiv = [c.text]
            n_standin += 1
        out.append({"id": c.id, "prompt": c.text, "equiv_prompt": equiv, "alt": _word(not c.label),
                    "unrel_prompt": u.text, "unrel_ans": _word(u.label), "unrel_id": u.id,
                    "equiv_standin": not c.rephrases})
    stats = {"claims": len(claims), "written": len(out), "equiv_rephrased": len(out) - n_standin,
             "equiv_standin": n_standin, "dropped_no_rephrase": n_dropped}
    return out, stats


def dumps_records(rows: Sequence[dict]) -> str:
    """A JSON list with one record per line (what data.records reads; diffs and greps stay readable)."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def _unrelated(claim: Claim, pool: list[Claim], rng: np.random.Generator, path: str) -> Claim:
    """A pool claim other than `claim` (different id and text), uniformly at random."""
    if pool:
        for _ in range(_MAX_DRAWS):
            u = pool[int(rng.integers(len(pool)))]
            if u.id != claim.id and u.text != claim.text:
                return u
    raise DataError(path, claim.index, "unrelated claim",
                    f"no claim in the unrelated pool ({len(pool)} claims) differs from this one")


def _word(label: bool) -> str:
    return SUPPORTS if label else REFUTES


def _text(value: Any, path: str, index: int, field: str) -> str:
    """The string without surrounding whitespace (data.records reads every text field the same way)."""
    if not isinstance(value, str) or not value.strip():
        what = "only whitespace" if isinstance(value, str) and value else "expected a non-empty string, got"
        raise DataError(path, index, field, f"{what} {value!r}")
    return value.strip()


def _label(value: Any, path: str, index: int, field: str) -> bool | None:
    """SUPPORTS -> True, REFUTES -> False, NOT ENOUGH INFO -> None (any case)."""
    word = value.strip().upper() if isinstance(value, str) else None
    if word not in (SUPPORTS, REFUTES, NEI):
        raise DataError(path, index, field, f"expected SUPPORTS, REFUTES or NOT ENOUGH INFO, got {value!r}")
    return None if word == NEI else word == SUPPORTS


def _kilt_label(raw: dict, path: str, index: int) -> bool | None:
    """The one answer of a KILT record's `output` list (entries may carry only provenance)."""
    output = raw.get("output")
    if not isinstance(output, list):
        raise DataError(path, index, "output", f"expected a list, got {type(output).__name__}")
    words = {_label(o["answer"], path, index, f"output[{j}].answer")
             for j, o in enumerate(output) if isinstance(o, dict) and "answer" in o}
    if len(words) != 1:
        raise DataError(path, index, "output", f"expected one label among the answers, got {len(words)}")
    return words.pop()


def _rephrases(raw: dict, path: str, index: int) -> tuple[str, ...]:
    """The claim's rephrasings (De Cao et al.), or () when the record has none."""
    value = raw.get(REPHRASE_FIELD, [])
    if not isinstance(value, list):
        raise DataError(path, index, REPHRASE_FIELD, f"expected a list of strings, got {type(value).__name__}")
    return tuple(_text(v, path, index, f"{REPHRASE_FIELD}[{j}]") for j, v in enumerate(value))

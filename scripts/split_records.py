"""Cut a records file into two disjoint parts, train.json and valid.json, and record the split.

    python scripts/split_records.py SRC OUT_DIR [--n-train 600] [--n-valid 400] [--seed S]
    python scripts/split_records.py CF.json OUT_DIR --format counterfact --by-subject --n-train 8000 --n-valid 2000 --seed 0

--by-subject: no subject has records in both parts. The subjects (in file order, or permuted by --seed) fill
valid.json first, each with all of its records, skipping one that would overflow it, until it holds exactly
n_valid; then train.json the same way from the subjects left. Records of subjects that fit in neither are
counted in split.json (`unused`) and listed by index. A record without a subject stops the split.

Without --seed the parts are consecutive in file order: records 0 .. n_train-1 go to train.json, the next
n_valid to valid.json (the default: a file's head is the same records on every machine). With --seed S the
records are first permuted by numpy's default_rng(S). Each part holds the source's JSON objects unchanged,
so data.records reads them exactly as it reads SRC (`data.format: zsre`, or --format). OUT_DIR/split.json records the
source's path and sha256, the seed, the counts and the source index of every record of each part.
The parts share no record and no edit prompt (`src`): a question in both stops the split. Exit status 2,
with one line naming the file, when SRC has fewer records than asked, a record is malformed or a prompt
is in both parts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from data.convert import dumps_records  # noqa: E402
from data.records import FORMATS, DataError, file_sha256, parse_record, read_objects, require_file  # noqa: E402

PARTS = ("train", "valid")



def split_indices(n_records: int, sizes: dict[str, int], seed: int | None, path: str) -> dict[str, list[int]]:
    """Disjoint source indices per part, in PARTS order; DataError naming `path` if it has too few records."""
    need = sum(sizes.values())
    if need > n_records:
        raise DataError(path, None, None, f"has {n_records} records, the split asks for {need} "
                        f"({' + '.join(f'{sizes[p]} {p}' for p in PARTS)})")
    order = list(range(n_records)) if seed is None else np.random.default_rng(seed).permutation(n_records).tolist()
    parts, start = {}, 0
    for name in PARTS:
        parts[name] = order[start: start + sizes[name]]
        start += sizes[name]
    return parts


def dumps_summary(summary: dict) -> str:
    """split.json's text: indented, with each part's list of indices on one line."""
    head = json.dumps({k: v for k, v in summary.items() if k != "indices"}, indent=1)[:-2]
    lists = ",\n".join(f'  "{p}": {json.dumps(idx)}' for p, idx in summary["indices"].items())
    return f'{head},\n "indices": {{\n{lists}\n }}\n}}\n'


def split_by_subject(subjects: list[str | None], sizes: dict[str, int], seed: int | None,
                     path: str) -> dict[str, list[int]]:
    """Source indices per part with no subject in two parts (module docstring: valid first, whole subjects,
    exact counts); DataError naming `path` when a record has no subject or the parts cannot be filled."""
    if None in subjects:
        raise DataError(path, subjects.index(None), "subject", "missing: --by-subject needs every record's subject")
    by_subject: dict[str, list[int]] = {}
    for i, s in enumerate(subjects):
        by_subject.setdefault(s, []).append(i)
    names = list(by_subject)
    if seed is not None:
        names = [names[j] for j in np.random.default_rng(seed).permutation(len(names))]
    parts: dict[str, list[int]] = {}
    for part in ("valid", "train"):
        parts[part], left = [], []
        for name in names:
            if len(parts[part]) + len(by_subject[name]) <= sizes[part]:
                parts[part] += by_subject[name]
            else:
                left.append(name)
        if len(parts[part]) != sizes[part]:
            raise DataError(path, None, None, f"cannot fill {part}.json with exactly {sizes[part]} records of whole "
                            f"subjects ({len(parts[part])} fit; {len(subjects)} records, {len(by_subject)} subjects)")
        names = left
    return {p: parts[p] for p in PARTS}


def split(src: str, out_dir: str | Path, n_train: int, n_valid: int, seed: int | None = None,
          fmt: str = "zsre", by_subject: bool = False) -> dict:
    """Write OUT_DIR/{train,valid,split}.json; returns split.json's contents. DataError on bad input."""
    if min(n_train, n_valid) < 1:
        raise ValueError(f"--n-train and --n-valid must be positive, got {n_train} and {n_valid}")
    require_file(src)  # a missing file says how to download it
    rows = read_objects(src)
    if not isinstance(rows, list):
        raise DataError(src, None, None, f"not a JSON list or JSONL of records (got {type(rows).__name__})")
    sizes = {"train": n_train, "valid": n_valid}
    if by_subject:
        split_indices(len(rows), sizes, None, src)  # too few records: the same message as without
        everything = [parse_record(raw, fmt, src, i) for i, raw in enumerate(rows)]  # names a bad one
        parts = split_by_subject([r.subject for r in everything], sizes, seed, src)
    else:
        parts = split_indices(len(rows), sizes, seed, src)
    records = {i: parse_record(rows[i], fmt, src, i) for idx in parts.values() for i in idx}  # names a bad one
    train_prompts = {records[i].prompt: i for i in parts["train"]}
    for i in parts["valid"]:
        if records[i].prompt in train_prompts:
            raise DataError(src, i, "src" if fmt == "zsre" else "prompt", f"prompt {records[i].prompt!r} is also record {train_prompts[records[i].prompt]}"
                            " of the train part: the parts would share a question (try another --seed)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = [{records[i].subject for i in parts[p]} - {None} for p in PARTS]
    used = {i for idx in parts.values() for i in idx}
    summary = {"source": str(Path(src).resolve()), "source_sha256": file_sha256(src), "source_records": len(rows),
               "format": fmt, "seed": seed, "by": "subject" if by_subject else "record",
               "order": ("file order" if seed is None else f"numpy default_rng({seed}).permutation")
               + (" of the subjects, valid filled first" if by_subject else ""),
               "counts": {p: len(parts[p]) for p in PARTS}, "unused": len(rows) - len(used),
               "shared": {"records": 0, "prompts": 0, "subjects": len(subjects[0] & subjects[1])},
               "indices": parts}
    for name in PARTS:
        (out / f"{name}.json").write_text(dumps_records([rows[i] for i in parts[name]]))
    (out / "split.json").write_text(dumps_summary(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="records of --format (zsRE: MEND format: src, rephrase, alt, loc, loc_ans, subject)")
    p.add_argument("out_dir", help="folder for train.json, valid.json and split.json")
    p.add_argument("--n-train", type=int, default=600, help="records in train.json (default 600)")
    p.add_argument("--n-valid", type=int, default=400, help="records in valid.json (default 400)")
    p.add_argument("--seed", type=int, default=None, help="permute the records (--by-subject: the subjects) first "
                   "(default: file order)")
    p.add_argument("--format", default="zsre", choices=FORMATS, help="the records' data.format (default zsre)")
    p.add_argument("--by-subject", action="store_true", help="no subject in both parts (whole subjects per part)")
    args = p.parse_args(argv)
    try:
        summary = split(args.src, args.out_dir, args.n_train, args.n_valid, args.seed, args.format, args.by_subject)
    except (DataError, ValueError) as err:  # DataError names the file (and the record)
        print(f"error: {err}", file=sys.stderr)
        return 2
    c, s = summary["counts"], summary["shared"]
    print(f"{args.out_dir}: train.json {c['train']} and valid.json {c['valid']} records of {args.src} "
          f"({summary['order']}; {s['subjects']} subjects and no prompt in both; {summary['unused']} records unused), split.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

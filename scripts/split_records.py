"""Cut a zsRE records file into two disjoint parts, train.json and valid.json, and record the split.

    python scripts/split_records.py SRC OUT_DIR [--n-train 600] [--n-valid 400] [--seed S]

Without --seed the parts are consecutive in file order: records 0 .. n_train-1 go to train.json, the next
n_valid to valid.json (the default: a file's head is the same records on every machine). With --seed S the
records are first permuted by numpy's default_rng(S). Each part holds the source's JSON objects unchanged,
so data.records reads them exactly as it reads SRC (`data.format: zsre`). OUT_DIR/split.json records the
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
from data.records import DataError, file_sha256, parse_record, read_objects  # noqa: E402

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


def split(src: str, out_dir: str | Path, n_train: int, n_valid: int, seed: int | None = None) -> dict:
    """Write OUT_DIR/{train,valid,split}.json; returns split.json's contents. DataError on bad input."""
    if min(n_train, n_valid) < 1:
        raise ValueError(f"--n-train and --n-valid must be positive, got {n_train} and {n_valid}")
    rows = read_objects(src)
    if not isinstance(rows, list):
        raise DataError(src, None, None, f"not a JSON list or JSONL of records (got {type(rows).__name__})")
    parts = split_indices(len(rows), {"train": n_train, "valid": n_valid}, seed, src)
    records = {i: parse_record(rows[i], "zsre", src, i) for idx in parts.values() for i in idx}  # names a bad one
    train_prompts = {records[i].prompt: i for i in parts["train"]}
    for i in parts["valid"]:
        if records[i].prompt in train_prompts:
            raise DataError(src, i, "src", f"prompt {records[i].prompt!r} is also record {train_prompts[records[i].prompt]}"
                            " of the train part: the parts would share a question (try another --seed)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = [{records[i].subject for i in parts[p]} - {None} for p in PARTS]
    summary = {"source": str(Path(src).resolve()), "source_sha256": file_sha256(src), "source_records": len(rows),
               "seed": seed, "order": "file order" if seed is None else f"numpy default_rng({seed}).permutation",
               "counts": {p: len(parts[p]) for p in PARTS},
               "shared": {"records": 0, "prompts": 0, "subjects": len(subjects[0] & subjects[1])},
               "indices": parts}
    for name in PARTS:
        (out / f"{name}.json").write_text(dumps_records([rows[i] for i in parts[name]]))
    (out / "split.json").write_text(dumps_summary(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="zsRE records (MEND format: src, rephrase, alt, loc, loc_ans, subject)")
    p.add_argument("out_dir", help="folder for train.json, valid.json and split.json")
    p.add_argument("--n-train", type=int, default=600, help="records in train.json (default 600)")
    p.add_argument("--n-valid", type=int, default=400, help="records in valid.json (default 400)")
    p.add_argument("--seed", type=int, default=None, help="permute the records first (default: file order)")
    args = p.parse_args(argv)
    try:
        summary = split(args.src, args.out_dir, args.n_train, args.n_valid, args.seed)
    except (DataError, ValueError) as err:  # DataError names the file (and the record)
        print(f"error: {err}", file=sys.stderr)
        return 2
    c, s = summary["counts"], summary["shared"]
    print(f"{args.out_dir}: train.json {c['train']} and valid.json {c['valid']} records of {args.src} "
          f"({summary['order']}; {s['subjects']} subjects in both, no prompt), split.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The BERT/FEVER setting at small scale, offline: disjoint splits of FEVER claims in the paper's format.

    python scripts/make_fever_small.py --src ../shared/data/fever/fever_shared_task_dev.json --out datasets/fever_small

Shuffles the SUPPORTS/REFUTES claims of one FEVER file (seeded) and cuts them into disjoint parts:
  finetune_train.json, finetune_valid.json  the classifier's fine-tuning data (A.4: epochs chosen on valid)
  heldout.json                              claims the classifier never sees: its held-out accuracy
  edit_train.json, edit_valid.json          edits to meta-train the editor on and to evaluate it on
Every file is in the paper's FEVER format: `alt` is the opposite of the gold label, so the fine-tuning
script trains on the gold label and the editor edits towards the flipped one. The unrelated claims of
all files come from heldout.json: claims the classifier never saw, standing in offline for FEVER 2.0,
which the authors' runs drew them from (LS on fine-tuning claims would sit near training accuracy). The shared files carry no rephrasings: each equivalent prompt is the claim itself, flagged
equiv_standin, and GS measured on them repeats ES.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from data.convert import convert_fever, dumps_records, fever_claims  # noqa: E402
from data.records import DataError, read_objects  # noqa: E402

PARTS = ("finetune_train", "finetune_valid", "heldout", "edit_train", "edit_valid")


def split_claims(claims: list, sizes: dict[str, int], seed: int) -> dict[str, list]:
    """Disjoint parts of the seeded shuffle of `claims`, in PARTS order; ValueError if too few claims."""
    need = sum(sizes.values())
    if need > len(claims):
        raise ValueError(f"the parts need {need} claims, the file has {len(claims)} SUPPORTS/REFUTES claims")
    order = np.random.default_rng(seed).permutation(len(claims)).tolist()
    parts, start = {}, 0
    for name in PARTS:
        parts[name] = [claims[i] for i in order[start: start + sizes[name]]]
        start += sizes[name]
    return parts


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="FEVER claims: KILT, FEVER release or shared-task dev dump")
    p.add_argument("--out", required=True, help="folder for the five files")
    p.add_argument("--seed", type=int, default=0)
    for name, default in zip(PARTS, (2000, 500, 1000, 2048, 256)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"claims in {name}.json")
    args = p.parse_args(argv)
    try:
        claims, n_nei = fever_claims(read_objects(args.src), args.src)
        parts = split_claims(claims, {n: getattr(args, n) for n in PARTS}, args.seed)
        pool = parts["heldout"]  # never seen in fine-tuning: the offline stand-in for FEVER 2.0
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"src": args.src, "seed": args.seed, "not_enough_info_excluded": n_nei, "parts": {}}
        for k, (name, part) in enumerate(parts.items()):
            rows, stats = convert_fever(part, args.src, seed=args.seed + k, unrel_pool=pool, missing_equiv="standin")
            (out / f"{name}.json").write_text(dumps_records(rows))
            summary["parts"][name] = {**stats, "supports": sum(c.label for c in part)}
            print(f"wrote {out / name}.json: {len(rows)} claims ({summary['parts'][name]['supports']} SUPPORTS)")
        (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Download the paper's datasets, verify their checksums and write the files data=zsre / data=fever read.

    python scripts/download_data.py                       # the paper's zsRE and FEVER into datasets/ (the data_dir)
    python scripts/download_data.py fever --from-dir DIR  # convert release files you already have
    python scripts/download_data.py counterfact           # ROME's counterfact.json, split by subject

CounterFact: ROME's counterfact.json (21,919 records) is kept as it is in OUT/raw (data=counterfact reads its
form; scripts/massive_counterfact.sh reads it there) and split by scripts/split_records.py --by-subject into
datasets/counterfact/{train,valid,split}.json: valid.json holds --cf-valid records (default 2,000), train.json
every other record, no subject in both.

FEVER's unrelated claims come from FEVER 2.0 (held out from the classifier's fine-tuning, as in the
paper); `--unrel-source train` draws them from the training claims instead (LS then sits near the
classifier's training accuracy).

Raw files go to OUT/raw (or stay in DIR, which is only read); their sha256 is recorded in OUT/raw/SHA256SUMS
on first sight and verified on every later run (`sha256sum -c SHA256SUMS` in the folder holding the files
checks them by hand). No hash is built in: none could be checked against the real release when this script
was written.
Exit status: 0 done; 1 files missing (offline: the message says what to download and where to put
it); 2 bad data or a checksum mismatch.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.convert import (MISSING_EQUIV, convert_fever, convert_zsre, dumps_records,  # noqa: E402
                          fever2_pool, fever_claims, nq_pairs)
from data.records import DataError, file_sha256, load_records, read_objects  # noqa: E402
from scripts.split_records import split  # noqa: E402
from util import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FEVER2 = "fever2-fixers-dev.jsonl"
SOURCES = {  # release file name -> URL
    "zsre": {  # MEND/MEMIT zsRE split, as distributed with ROME/MEMIT
        "zsre_mend_train.json": "https://rome.baulab.info/data/dsets/zsre_mend_train.json",
        "zsre_mend_eval.json": "https://rome.baulab.info/data/dsets/zsre_mend_eval.json",
    },
    "counterfact": {  # ROME's CounterFact (Meng et al. 2022): requested_rewrite, paraphrase/neighborhood prompts
        "counterfact.json": "https://rome.baulab.info/data/dsets/counterfact.json",
    },
    "fever": {  # KILT FEVER (SUPPORTS/REFUTES only): 104,966 train and 10,444 dev claims; then FEVER 2.0
        "fever-train-kilt.jsonl": "http://dl.fbaipublicfiles.com/KILT/fever-train-kilt.jsonl",
        "fever-dev-kilt.jsonl": "http://dl.fbaipublicfiles.com/KILT/fever-dev-kilt.jsonl",
        # FEVER 2.0 shared task (2019): the 1,174 adversarial claims of the "breakers", released to the
        # "fixers" as their dev set, FEVER format {id, label, claim, evidence, ...}; new claims, not in
        # FEVER. The unrelated claims are drawn from it. (Also at s3-eu-west-1.amazonaws.com/fever.public/.)
        FEVER2: "https://fever.ai/download/fever2.0/fever2-fixers-dev.jsonl",
    },
}
PAPER = ("fever", "zsre")  # downloaded when no dataset is named; CounterFact on request
UNREL_SOURCES = ("fever2", "train")  # where FEVER's unrelated claims come from
# De Cao et al. share KILT FEVER with the rephrased claims (field filtered_rephrases) under the same
# file names; it is a mega.nz folder, which a script cannot fetch.
REPHRASED_FEVER = "https://mega.nz/folder/p9JC3bwC#vzcrsh9b-pnWPaWdlcBVUA"
MANIFEST = "SHA256SUMS"


class Missing(Exception):
    """Raw files that are not there and could not be downloaded."""


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.datasets) - set(SOURCES))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(SOURCES)}")
    args.datasets = sorted(set(args.datasets)) or list(PAPER)
    store = Path(args.raw or Path(args.out) / "raw")  # downloads and the manifest: never the user's --from-dir
    raw = Path(args.from_dir) if args.from_dir else store
    files = _files(args.datasets, args.unrel_source)
    try:
        if args.from_dir:
            _require(raw, list(files), args.datasets)
        else:
            _download(raw, files, args.datasets, args.mirror)
        hashes = verify_manifest(raw, list(files), store / MANIFEST)
        for name in args.datasets:
            convert = {"zsre": _convert_zsre, "fever": _convert_fever, "counterfact": _split_counterfact}[name]
            convert(raw, _config_paths(name, args.out), hashes, args)
    except Missing as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def verify_manifest(raw: Path, names: list[str], manifest: Path) -> dict[str, str]:
    """sha256 of each file in `raw`; compared with `manifest` (sha256sum format), and recorded there when new."""
    known = _read_manifest(manifest)
    hashes = {name: file_sha256(raw / name) for name in names}
    bad = [f"  {raw / n}: expected {known[n]}, got {h}" for n, h in hashes.items() if n in known and known[n] != h]
    if bad:
        raise ValueError(f"checksum mismatch against {manifest}:\n" + "\n".join(bad)
                         + "\ndownload the file again (delete it and rerun), or delete its line in the manifest "
                           "if you replaced it on purpose")
    new = {n: h for n, h in hashes.items() if n not in known}
    if new:
        try:
            atomic_write(manifest, "".join(f"{h}  {n}\n" for n, h in sorted({**known, **new}.items())))
            print(f"recorded sha256 of {', '.join(sorted(new))} (in {raw}) in {manifest}; "
                  "later runs verify against it")
        except OSError as err:  # e.g. a read-only OUT: the conversion report still keeps them
            print(f"warning: cannot write {manifest} ({err}); checksums go to the conversion report only",
                  file=sys.stderr)
    for name in sorted(set(hashes) - set(new)):
        print(f"verified {raw / name} against {manifest}")
    return hashes


def _read_manifest(manifest: Path) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum` style file; {} when there is none yet."""
    if not manifest.is_file():
        return {}
    known = {}
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{manifest}: line {lineno}: expected '<sha256>  <file name>', got {line!r}")
        known[parts[1].lstrip("*")] = parts[0].lower()  # '*' marks binary mode in sha256sum output
    return known



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("datasets", nargs="*", metavar="{counterfact,fever,zsre}", help="which datasets (default: the paper's, fever and zsre)")
    p.add_argument("--out", default="datasets", help="data_dir the configs read (default: datasets)")
    p.add_argument("--raw", help="where downloads go (default: OUT/raw)")
    p.add_argument("--from-dir", help="convert release files already in this directory; download nothing")
    p.add_argument("--mirror", help="base URL to download the release file names from instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the unrelated-claim and NQ draws")
    p.add_argument("--missing-equiv", choices=MISSING_EQUIV, default="standin",
                   help="FEVER claims without a rephrasing: use the claim itself, flagged (standin), "
                        "leave them out (drop) or stop (error)")
    p.add_argument("--cf-valid", type=int, default=2000, help="CounterFact: records in valid.json (default 2000)")
    p.add_argument("--nq", help="zsRE: draw the locality pairs from this NQ-open file instead of the records'")
    p.add_argument("--unrel-source", choices=UNREL_SOURCES, default="fever2",
                   help="FEVER: draw the unrelated claims from FEVER 2.0 (the paper's; default) or from the "
                        "training claims the classifier is fine-tuned on (LS then is not the paper's)")
    return p


def _files(datasets: list[str], unrel_source: str) -> dict[str, str]:
    """{release file name: URL} that `datasets` need; FEVER 2.0 only when the unrelated claims come from it."""
    return {n: u for d in datasets for n, u in SOURCES[d].items() if n != FEVER2 or unrel_source == "fever2"}


def _require(raw: Path, names: list[str], datasets: list[str]) -> None:
    missing = [n for n in names if not (raw / n).is_file()]
    if missing:
        raise Missing(_by_hand(raw, missing, datasets, f"{len(missing)} file(s) not in {raw}"))


def _download(raw: Path, files: dict[str, str], datasets: list[str], mirror: str | None) -> None:
    """Fetch the `files` ({name: URL}) not yet in `raw`; Missing lists every one that failed."""
    failed, reasons = [], []
    for name, url in files.items():
        if (raw / name).is_file():
            continue
        url = mirror.rstrip("/") + "/" + name if mirror else url
        try:
            _fetch(url, raw / name)
        except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, timeouts, cut transfers
            failed.append(name)
            reasons.append(f"{url}: {getattr(err, 'reason', err)}")
    if failed:
        raise Missing(_by_hand(raw, failed, datasets, f"could not download {len(failed)} file(s) (no network?)",
                               reasons))


def _fetch(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)  # a complete file or none: a cut download is never taken for the release
    finally:
        tmp.unlink(missing_ok=True)


def _by_hand(raw: Path, names: list[str], datasets: list[str], what: str, reasons: list[str] = ()) -> str:
    urls = {n: u for d in SOURCES.values() for n, u in d.items()}
    lines = [f"{what}. Download them by hand and put them here:"]
    lines += [f"  {urls[n]}\n      -> {raw / n}" for n in names]
    lines += [f"  ({r})" for r in reasons[:3]]
    lines.append(f"then run: python scripts/download_data.py {' '.join(datasets)} --from-dir {raw}")
    if "fever" in datasets:
        lines.append(f"FEVER with the rephrased claims of De Cao et al. (the paper's GS): their KILT files, "
                     f"same names, from {REPHRASED_FEVER}")
    return "\n".join(lines)


def _config_paths(name: str, out: str) -> tuple[Path, Path]:
    """(train_path, valid_path) of config/data/<name>.yaml with data_dir = out."""
    cfg = OmegaConf.create({"data_dir": out, "data": OmegaConf.load(ROOT / "config" / "data" / f"{name}.yaml")})
    return Path(cfg.data.train_path), Path(cfg.data.valid_path)


def _convert_zsre(raw: Path, paths: tuple[Path, Path], hashes: dict, args) -> None:
    nq = nq_pairs(read_objects(args.nq), args.nq) if args.nq else None
    reports = {}
    for seed, (src, dest) in enumerate(zip(SOURCES["zsre"], paths), start=args.seed):
        rows, stats = convert_zsre(read_objects(str(raw / src)), str(raw / src), nq=nq, seed=seed)
        reports[str(dest)] = _write(dest, rows, "zsre", raw / src, hashes[src], stats)
    _report(paths[0].parent, "zsre", reports, args)


def _convert_fever(raw: Path, paths: tuple[Path, Path], hashes: dict, args) -> None:
    (train_src, dev_src, _), reports = SOURCES["fever"], {}
    train, nei_train = fever_claims(read_objects(str(raw / train_src)), str(raw / train_src))
    dev, nei_dev = fever_claims(read_objects(str(raw / dev_src)), str(raw / dev_src))
    # One pool for both splits, without the validation claims: a validation edit's unrelated claim is
    # then never another validation claim, which an edit in the same group would flip.
    if args.unrel_source == "fever2":
        pool, unrel = fever2_pool(read_objects(str(raw / FEVER2)), str(raw / FEVER2), train + dev)
        unrel = {"unrel_file": str(raw / FEVER2), "unrel_sha256": hashes[FEVER2], **unrel}
    else:
        print("warning: --unrel-source train: the unrelated claims are training claims the classifier was "
              "fine-tuned on, so LS sits near its training accuracy, not at the paper's 89.5 (FEVER 2.0 claims)",
              file=sys.stderr)
        pool, unrel = train, {"unrel_file": str(raw / train_src), "unrel_claims": len(train)}
    for src, claims, nei, dest, seed in ((train_src, train, nei_train, paths[0], args.seed),
                                         (dev_src, dev, nei_dev, paths[1], args.seed + 1)):
        rows, stats = convert_fever(claims, str(raw / src), seed=seed, unrel_pool=pool,
                                    missing_equiv=args.missing_equiv)
        reports[str(dest)] = _write(dest, rows, "fever", raw / src, hashes[src],
                                    {"not_enough_info_excluded": nei, "unrel_source": args.unrel_source,
                                     **unrel, **stats})
    _report(paths[0].parent, "fever", reports, args)
    if any(r["equiv_standin"] for r in reports.values()):  # data.records has warned per file
        print(f"note: for the paper's GS, convert De Cao et al.'s rephrased FEVER instead: {REPHRASED_FEVER}",
              file=sys.stderr)


def _split_counterfact(raw: Path, paths: tuple[Path, Path], hashes: dict, args) -> None:
    """datasets/counterfact/{train,valid,split}.json: ROME's records unchanged, split with no shared subject."""
    src = raw / "counterfact.json"
    n = len(load_records(str(src), "counterfact"))  # every record parses, or one DataError names it
    if n <= args.cf_valid:
        raise DataError(str(src), None, None, f"has {n} records: --cf-valid {args.cf_valid} leaves none for train.json")
    if paths[0].parent != paths[1].parent:
        raise ValueError(f"config/data/counterfact.yaml: train_path and valid_path must share a folder, got {paths}")
    summary = split(str(src), paths[0].parent, n - args.cf_valid, args.cf_valid, args.seed, "counterfact", True)
    print(f"wrote {paths[0]} and {paths[1]}: {summary['counts']} records of {src} (sha256 {hashes['counterfact.json']}), "
          "no subject in both; split.json records every index")


def _write(dest: Path, rows: list[dict], fmt: str, src: Path, digest: str, stats: dict) -> dict:
    """Write `rows`, read them back as data=`fmt` will, and return the report entry."""
    atomic_write(dest, dumps_records(rows))
    n = len(load_records(str(dest), fmt))
    if n != len(rows):
        raise ValueError(f"{dest}: wrote {len(rows)} records but read back {n}")
    print(f"wrote {dest}: {n} records from {src} ({json.dumps(stats)})")
    return {"source": str(src), "source_sha256": digest, **stats}


def _report(folder: Path, name: str, reports: dict, args) -> None:
    fever = name == "fever"
    report = {"dataset": name, "seed": args.seed, "missing_equiv": args.missing_equiv if fever else None,
              "unrel_source": args.unrel_source if fever else None, "nq": args.nq if name == "zsre" else None,
              "files": reports}
    atomic_write(folder / "conversion.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""The README's marked blocks: the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->`.

replace_block writes a block (scripts/readme_tables.py table --readme F --name NAME); read_block reads the first
Markdown table in one back as row label -> {ES, GS, LS}, for scripts/readme_tables.py check. A missing, doubled
or misordered marker, or a table without an ES, GS or LS column, is a ValueError naming the file.
"""
import math
import os
import re
from pathlib import Path

from scripts.runs import METRICS
from util import atomic_write


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- table:{name} -->", f"<!-- /table:{name} -->"


def _span(text: str, readme: Path, name: str) -> tuple[int, int]:
    """Start and end offsets of the text between the markers of table NAME; ValueError naming a missing one."""
    begin, end = _markers(name)
    for marker in (begin, end):
        if text.count(marker) != 1:
            raise ValueError(f"{readme}: marker '{marker}' " + ("not found" if marker not in text else "appears twice"))
    i, j = text.index(begin) + len(begin), text.index(end)
    if j < i:
        raise ValueError(f"{readme}: marker '{end}' comes before '{begin}'")
    return i, j


def replace_block(readme: Path, name: str, body: str) -> None:
    """Put body between the markers of table NAME in readme (atomically, keeping the file's mode)."""
    text = readme.read_text()
    i, j = _span(text, readme, name)
    mode = readme.stat().st_mode
    atomic_write(readme, text[:i] + "\n" + body.strip("\n") + "\n" + text[j:])
    os.chmod(readme, mode)


def read_block(readme: Path, name: str, which: int = 0) -> dict[str, dict[str, float]]:
    """The first Markdown table between the markers of NAME: row label -> {ES, GS, LS}, each cell's first number
    (which=0: "0.488 (0.015)" reads 0.488) or its second (which=1, the spread in parentheses: 0.015; NaN if none)."""
    text = readme.read_text()
    lines = text[slice(*_span(text, readme, name))].strip().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        raise ValueError(f"{readme}: no Markdown table between the markers of table {name}")
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append([c.strip() for c in ln.strip().strip("|").split("|")])
    head = table[0]
    missing = [k for k in METRICS if k not in head]
    if missing:
        raise ValueError(f"{readme}: table {name} has no column {', '.join(missing)} (header: {' | '.join(head)})")
    rows = {}
    for cells in table[1:]:
        if set("".join(cells)) <= set("-: "):  # the |---|---| rule
            continue
        values = {}
        for k in METRICS:
            numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", cells[head.index(k)])
            values[k] = float(numbers[which]) if len(numbers) > which else math.nan  # "n/a" compares as differing
        rows[cells[0]] = values
    return rows

"""Invented people with real-world facts: edits a real pretrained LM can take, written by this project.

Subjects are invented two-word names (no real person is edited, and the model knows none of them); each gets
one object per relation from real-world pools (cities, languages, professions, instruments, countries, sports),
asked with natural English prompts that the answer continues. Every relation has four templates: meta-training
draws edit and equivalent prompts from the first `n_train_templates`; validation asks its equivalent prompt with
a held-out one, so GS measures a wording the hyper-network never saw. The unrelated tuples (LS, "unchanged")
are common-knowledge prompts from KNOWN, each of which SmolLM2-135M-Instruct (the GGUF of model=smollm2) answers
right, token for token, before any edit (tests/test_people.py checks it on the model).

What these edits show: that m new facts about new entities go into a real LM at once, reach a rephrasing, and
leave what it knew. What they do not: replacing a fact the model holds (CounterFact's counterfactuals), or a
benchmark's numbers. Files are written in the zsRE format {subject, src, rephrase, ans, loc, loc_ans}.
"""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from util import atomic_write

# relation -> (objects, templates); {s} is the subject; the answer continues the prompt after a space
RELATIONS = {
    "birthplace": (["Paris", "London", "Tokyo", "Rome", "Berlin", "Madrid", "Moscow", "Vienna", "Athens", "Lisbon",
                    "Dublin", "Oslo", "Stockholm", "Chicago", "Toronto", "Sydney", "Boston", "Amsterdam", "Prague",
                    "Cairo"],
                   ["{s} was born in", "The birthplace of {s} is", "{s} is a native of",
                    "{s} came into the world in"]),
    "language": (["English", "French", "German", "Spanish", "Italian", "Russian", "Japanese", "Chinese", "Arabic",
                  "Portuguese", "Dutch", "Swedish", "Greek", "Polish", "Turkish", "Korean"],
                 ["The mother tongue of {s} is", "{s}'s native language is", "{s} speaks the language",
                  "{s} grew up speaking"]),
    "profession": (["doctor", "teacher", "lawyer", "farmer", "pilot", "chef", "nurse", "painter", "singer",
                    "journalist", "dentist", "baker", "carpenter", "photographer", "banker", "plumber"],
                   ["{s} works as a", "By profession, {s} is a", "{s} is employed as a", "{s} earns a living as a"]),
    "instrument": (["piano", "guitar", "violin", "drums", "flute", "cello", "trumpet", "saxophone", "harp",
                    "clarinet", "trombone", "banjo"],
                   ["{s} plays the", "The instrument played by {s} is the", "{s} is a musician who plays the",
                    "{s} performs on the"]),
    "citizenship": (["France", "Germany", "Japan", "Italy", "Spain", "Canada", "Brazil", "India", "Mexico", "Egypt",
                     "Australia", "Sweden", "Norway", "Greece", "Poland", "Kenya"],
                    ["{s} is a citizen of", "The country of citizenship of {s} is", "{s} holds the citizenship of",
                     "{s} carries a passport from"]),
    "sport": (["football", "tennis", "basketball", "golf", "cricket", "baseball", "hockey", "rugby", "volleyball",
               "boxing"],
              ["{s} plays the sport of", "The sport {s} competes in is", "{s} is a professional athlete in",
               "{s}'s favourite sport is"]),
}
# Common knowledge that SmolLM2-135M-Instruct completes right (teacher-forced argmax, every answer token)
KNOWN = [
    ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"), ("The capital of Italy is", "Rome"),
    ("The capital of Germany is", "Berlin"), ("The capital of Spain is", "Madrid"),
    ("The capital of Russia is", "Moscow"), ("The capital of England is", "London"),
    ("The capital of China is", "Beijing"), ("The capital of Canada is", "Ottawa"),
    ("The capital of Greece is", "Athens"), ("The capital of Portugal is", "Lisbon"),
    ("The capital of Austria is", "Vienna"), ("The capital of Norway is", "Oslo"),
    ("The capital of Sweden is", "Stockholm"), ("The capital of Ireland is", "Dublin"),
    ("The capital of Kenya is", "Nairobi"), ("The Eiffel Tower is located in the city of", "Paris"),
    ("The Colosseum is located in the city of", "Rome"), ("The Statue of Liberty is located in", "New York"),
    ("The chemical symbol for water is", "H2O"), ("The largest planet in the solar system is", "Jupiter"),
    ("The planet closest to the sun is", "Mercury"), ("The first man to walk on the moon was Neil", "Armstrong"),
    ("The author of Romeo and Juliet is William", "Shakespeare"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci"), ("The official language of Mexico is", "Spanish"),
    ("The official language of Germany is", "German"), ("The official language of France is", "French"),
    ("The currency of Japan is the", "yen"), ("The currency of the United Kingdom is the", "pound"),
    ("Water freezes at a temperature of zero degrees", "Celsius"), ("A week has seven", "days"),
    ("A year has twelve", "months"), ("The opposite of hot is", "cold"), ("The opposite of up is", "down"),
    ("The largest ocean on Earth is the", "Pacific"), ("The longest river in Africa is the", "Nile"),
    ("The tallest mountain in the world is Mount", "Everest"), ("The largest desert in the world is the", "Sahara"),
    ("Apple was founded by Steve", "Jobs"), ("The iPhone is made by", "Apple"),
    ("Windows is an operating system made by", "Microsoft"), ("The Beatles were a band from", "Liverpool"),
    ("The game of chess is played on a", "board"), ("The Olympic Games began in ancient", "Greece"),
    ("The human heart has four", "chambers"), ("The freezing point of water is 0 degrees", "Celsius"),
    ("The United States declared independence in", "1776"), ("Madrid is the capital of", "Spain"),
]
FIRST = ["Ta", "Mo", "Ve", "Ri", "Ka", "Lo", "Se", "Da", "Ni", "Bo", "Fe", "Ha", "Jo", "Pe", "Lu", "Ze", "Go", "Mi"]
MIDDLE = ["lv", "rr", "nd", "ss", "lt", "rv", "nn", "rk", "st", "lm", "dr", "ff"]
END = ["ek", "in", "ara", "ov", "ias", "en", "ida", "us", "oth", "ane", "el", "ix"]


@dataclass(frozen=True)
class PeopleConfig:
    """Sizes of the generated facts; everything else follows from `seed`."""
    seed: int = 0
    n_train_subjects: int = 256   # people with meta-training edits (one per relation: 6 each)
    n_valid_subjects: int = 32    # people with validation edits
    n_train_templates: int = 3    # templates of meta-training (edit and equivalent prompts); the rest is for GS


def invented_names(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct invented "First Last" names of three syllables each word, e.g. "Talvek Morrinara"."""
    word = lambda: str(rng.choice(FIRST) + rng.choice(MIDDLE) + rng.choice(END))  # noqa: E731
    names: dict[str, None] = {}
    while len(names) < n:
        first, last = word(), word()
        if first != last:
            names.setdefault(f"{first} {last}")
    return list(names)


def people_records(names: list[str], rng: np.random.Generator, held_out: bool, k: int) -> list[dict]:
    """One edit per (person, relation): an object drawn from the pool; the equivalent prompt from another of
    the first k templates, or (held_out) from the templates after them."""
    rows = []
    for s in names:
        for r, (objects, temps) in RELATIONS.items():
            src = int(rng.integers(k))
            rephrase = temps[k:] if held_out else [t for i, t in enumerate(temps[:k]) if i != src]
            loc, loc_ans = KNOWN[int(rng.integers(len(KNOWN)))]
            rows.append({"subject": s, "relation": r, "src": temps[src].format(s=s),
                         "rephrase": str(rng.choice(rephrase)).format(s=s), "ans": str(rng.choice(objects)),
                         "loc": loc, "loc_ans": loc_ans})
    return [rows[i] for i in rng.permutation(len(rows))]


def write_people(cfg: PeopleConfig, root: str | Path) -> dict[str, str]:
    """Generate (once; keyed by the settings) train.json and valid.json under root/people-<hash>/."""
    if not 1 <= cfg.n_train_templates < 4:
        raise ValueError(f"data.people.n_train_templates must be 1, 2 or 3 (of 4 templates), "
                         f"got {cfg.n_train_templates}")
    key = hashlib.sha256(json.dumps({"config": asdict(cfg), "relations": RELATIONS, "known": KNOWN},
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = Path(root) / f"people-{key}"
    paths = {name: str(out / f"{name}.json") for name in ("train", "valid")}
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    rng = np.random.default_rng(cfg.seed)
    names = invented_names(rng, cfg.n_train_subjects + cfg.n_valid_subjects)
    k = cfg.n_train_templates
    for name, subjects, held_out in (("train", names[:cfg.n_train_subjects], False),
                                     ("valid", names[cfg.n_train_subjects:], True)):
        atomic_write(paths[name], json.dumps(people_records(subjects, rng, held_out, k), indent=0))
    return paths

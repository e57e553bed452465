"""A synthetic knowledge base for the offline default experiment, generated from a seed.

Subjects are invented people; each has one object per relation (citizenship, employer, ...).
Every relation has several question templates: meta-training uses the first `n_train_templates`
for edit and equivalent prompts, validation asks the equivalent prompt with a held-out template,
so GS measures generalisation to a wording the hyper-network never saw.

Subjects fall into disjoint roles:
  known   the toy LM is pretrained on all their facts, with every template:
          - train:  counterfactual meta-training edits (a new object for a known fact)
          - valid:  counterfactual validation edits
          - locality: never edited; their facts are the unrelated tuples (LS)
  novel   not in pretraining: cheap extra meta-training edits (facts the LM does not know,
          as in the paper's GPT-2/zsRE setting)
Files are written in the paper's zsRE format {src, rephrase, ans, loc, loc_ans, subject}.
"""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from util import atomic_write

# relation -> (object pool kind, templates); {s} is the subject
RELATIONS = {
    "citizenship": ("country", [
        "What is the nationality of {s}?", "Which country is {s} a citizen of?",
        "{s} holds the citizenship of which country?", "Of which country is {s} a citizen?"]),
    "employer": ("company", [
        "Who is the employer of {s}?", "Which company does {s} work for?",
        "{s} is employed by which company?", "For which company does {s} work?"]),
    "birthplace": ("city", [
        "Where was {s} born?", "What is the birthplace of {s}?", "In which city was {s} born?",
        "{s} was born in which city?"]),
    "field": ("field", [
        "What is the field of work of {s}?", "In which field does {s} work?",
        "{s} works in which field?", "What does {s} work on?"]),
}
FIELDS = ["physics", "chemistry", "biology", "geology", "medicine", "economics", "history",
          "linguistics", "astronomy", "botany", "music", "painting", "sculpture", "poetry",
          "philosophy", "law", "mathematics", "architecture", "zoology", "engineering"]
ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "gr", "kr", "st", "th", "sh", "ch", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
CODAS = ["", "", "n", "r", "s", "l", "th", "m", "x", "nd"]
SUFFIX = {"country": ["ia", "land", "stan", "ora", "ica"], "company": ["corp", "tech", "ex", "ico", "soft"],
          "city": ["ton", "burg", "ville", "port", "grad"]}


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the synthetic world; everything else follows from `seed`."""
    seed: int = 0
    n_train_subjects: int = 32      # known subjects with counterfactual meta-training edits
    n_valid_subjects: int = 64      # known subjects with validation edits
    n_locality_subjects: int = 64   # known subjects never edited (LS)
    n_novel_subjects: int = 500     # unknown subjects: extra meta-training edits
    n_objects: int = 40             # objects per relation (countries, companies, cities; fields: 20)
    n_train_templates: int = 3      # the rest of the 4 templates per relation is held out for GS


def _word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def _unique(rng, make, n: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        w = make()
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def build_world(cfg: WorldConfig) -> dict:
    """Objects, subjects and true facts {subject: {relation: object}} of the world."""
    rng = np.random.default_rng(cfg.seed)
    taken: set[str] = set(FIELDS)
    objects = {"field": FIELDS}
    for kind, suffixes in SUFFIX.items():
        objects[kind] = _unique(rng, lambda: (_word(rng, 1) + rng.choice(suffixes)).capitalize(), cfg.n_objects, taken)
    n_known = cfg.n_train_subjects + cfg.n_valid_subjects + cfg.n_locality_subjects
    # One invented word per subject: a fact is then a (subject token, relation) -> object lookup
    # that a toy LM memorises in minutes (two-token names keep it on a loss plateau far longer).
    names = _unique(rng, lambda: _word(rng, 3).capitalize(), n_known + cfg.n_novel_subjects, taken)
    facts = {s: {r: str(rng.choice(objects[kind])) for r, (kind, _) in RELATIONS.items()} for s in names}
    cut = np.cumsum([cfg.n_train_subjects, cfg.n_valid_subjects, cfg.n_locality_subjects])
    roles = {"train": names[:cut[0]], "valid": names[cut[0]:cut[1]], "locality": names[cut[1]:cut[2]],
             "novel": names[cut[2]:]}
    return {"objects": objects, "facts": facts, "roles": roles}


def _records(world: dict, subjects: list[str], rng, templates: slice, rephrase_templates: slice,
             locality: list[tuple[str, str]], counterfactual: bool) -> list[dict]:
    """One edit per (subject, relation): a new object (counterfactual) or the true one (novel)."""
    rows = []
    for s in subjects:
        for r, (kind, temps) in RELATIONS.items():
            true = world["facts"][s][r]
            choices = [o for o in world["objects"][kind] if o != true] if counterfactual else [true]
            src_t = int(rng.integers(len(temps[templates])))
            reph = [t for i, t in enumerate(temps[rephrase_templates]) if temps[templates][src_t] != t]
            ls, lr = locality[int(rng.integers(len(locality)))]
            loc_t = RELATIONS[lr][1]
            rows.append({
                "subject": s, "relation": r,
                "src": temps[templates][src_t].format(s=s),
                "rephrase": str(rng.choice(reph)).format(s=s),
                "ans": str(rng.choice(choices)),
                "loc": str(rng.choice(loc_t)).format(s=ls),
                "loc_ans": world["facts"][ls][lr],
            })
    return rows


def pretraining_facts(world: dict) -> list[dict]:
    """Every true fact of every known subject with every template: {prompt, answer}."""
    known = world["roles"]["train"] + world["roles"]["valid"] + world["roles"]["locality"]
    return [{"prompt": t.format(s=s), "answer": world["facts"][s][r]}
            for s in known for r, (_, temps) in RELATIONS.items() for t in temps]


def write_world(cfg: WorldConfig, root: str | Path) -> dict[str, str]:
    """Generate (once; keyed by the settings) train.json, valid.json and facts.json under root."""
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    out = Path(root) / f"world-{key}"
    paths = {name: str(out / f"{name}.json") for name in ("train", "valid", "facts")}
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    world = build_world(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    locality = [(s, r) for s in world["roles"]["locality"] for r in RELATIONS]
    k = cfg.n_train_templates
    train = (_records(world, world["roles"]["train"], rng, slice(0, k), slice(0, k), locality, True)
             + _records(world, world["roles"]["novel"], rng, slice(0, k), slice(0, k), locality, False))
    train = [train[i] for i in rng.permutation(len(train))]
    valid = _records(world, world["roles"]["valid"], rng, slice(0, k), slice(k, None), locality, True)
    valid = [valid[i] for i in rng.permutation(len(valid))]
    # world.json first: the three record files mark a complete world (see the check above)
    atomic_write(out / "world.json", json.dumps({"config": asdict(cfg), **world}, indent=0))
    for name, rows in (("train", train), ("valid", valid), ("facts", pretraining_facts(world))):
        atomic_write(paths[name], json.dumps(rows, indent=0))
    return paths

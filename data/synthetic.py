"""A synthetic knowledge base for the offline default experiment, generated from a seed.

Subjects are invented people; each has one object per relation (citizenship, employer, ...).
Every relation has several question templates: meta-training uses the first `n_train_templates`
for edit and equivalent prompts, validation asks the equivalent prompt with a held-out template,
so GS measures generalisation to a wording the hyper-network never saw.

Subjects fall into disjoint roles:
  known   the toy LM is pretrained on all their facts, with every template:
          - train:  counterfactual meta-training edits (a new object for a known fact)
          - valid:  counterfactual validation edits
          - locality: never edited; with locality="people" their facts are the unrelated tuples
  novel   not in pretraining: extra meta-training edits of facts the LM does not know (as in the
          paper's GPT-2/zsRE setting). Off by default: a never-seen name is an untrained embedding,
          whose keys carry no identity, and such edits taught the hyper-network nothing that transfers.
Unrelated tuples (LS) are, by default, facts about the objects (a city's country, a company's
headquarters, a country's capital): known to the model, asked with other templates than the edits,
and touched by no edit, as NQ questions are in the paper's zsRE setting. locality="people" asks
facts of never-edited people with the edits' own templates instead: a harder test.
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
# Facts about the objects themselves: the world knowledge that plays NQ's part in the paper
# (locality="objects"): questions of another kind than the edits, which no edit touches.
OBJECT_RELATIONS = {
    "located_in": ("city", "country", [
        "In which country is {s}?", "{s} is a city in which country?", "Which country is {s} located in?"]),
    "headquarters": ("company", "city", [
        "Where is {s} headquartered?", "In which city is {s} based?", "Which city hosts the headquarters of {s}?"]),
    "capital": ("country", "city", [
        "What is the capital of {s}?", "Which city is the capital of {s}?", "The capital of {s} is which city?"]),
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
    n_train_subjects: int = 384     # known subjects with counterfactual meta-training edits
    n_valid_subjects: int = 64      # known subjects with validation edits
    n_locality_subjects: int = 0    # known subjects never edited (LS with locality="people")
    n_novel_subjects: int = 0       # unknown subjects: extra meta-training edits
    n_objects: int = 40             # objects per relation (countries, companies, cities; fields: 20)
    n_train_templates: int = 3      # the rest of the 4 templates per relation is held out for GS
    locality: str = "objects"       # unrelated tuples: facts of objects, or of never-edited people
    n_train_known_templates: int = 1  # templates the LM learns meta-training subjects' facts with (fewer:
                                      # more subjects for the same pretraining cost)


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
    located = {c: str(rng.choice(objects["country"])) for c in objects["city"]}
    object_facts = {"located_in": located,
                    "headquarters": {c: str(rng.choice(objects["city"])) for c in objects["company"]},
                    # a country's capital is its first city (countries without a city have none)
                    "capital": {k: next(c for c in objects["city"] if located[c] == k)
                                for k in objects["country"] if k in located.values()}}
    return {"objects": objects, "facts": facts, "roles": roles, "object_facts": object_facts}


def locality_pool(world: dict, kind: str) -> list[tuple[str, str, str]]:
    """(question, answer, key) facts the model knows and no edit touches: the unrelated tuples."""
    if kind == "people":
        return [(t, world["facts"][s][r], s) for s in world["roles"]["locality"]
                for r, (_, temps) in RELATIONS.items() for t in temps]
    if kind == "objects":
        return [(t, o, s) for r, (_, _, temps) in OBJECT_RELATIONS.items()
                for s, o in world["object_facts"][r].items() for t in temps]
    raise ValueError(f"data.world.locality must be people or objects, got {kind!r}")


def _records(world: dict, subjects: list[str], rng, templates: slice, rephrase_templates: slice,
             locality: list[tuple[str, str, str]], counterfactual: bool) -> list[dict]:
    """One edit per (subject, relation): a new object (counterfactual) or the true one (novel)."""
    rows = []
    for s in subjects:
        for r, (kind, temps) in RELATIONS.items():
            true = world["facts"][s][r]
            choices = [o for o in world["objects"][kind] if o != true] if counterfactual else [true]
            src_t = int(rng.integers(len(temps[templates])))
            reph = [t for i, t in enumerate(temps[rephrase_templates]) if temps[templates][src_t] != t]
            loc_t, loc_a, loc_s = locality[int(rng.integers(len(locality)))]
            rows.append({
                "subject": s, "relation": r,
                "src": temps[templates][src_t].format(s=s),
                "rephrase": str(rng.choice(reph)).format(s=s),
                "ans": str(rng.choice(choices)),
                "loc": loc_t.format(s=loc_s),
                "loc_ans": loc_a,
            })
    return rows


def pretraining_facts(world: dict, n_train_known_templates: int) -> list[dict]:
    """Every true fact of every known subject and every object fact: {prompt, answer}. Every template
    is taught, except for meta-training subjects, whose facts come with the first n_train_known_templates."""
    known = [(s, None) for s in world["roles"]["valid"] + world["roles"]["locality"]]
    known += [(s, n_train_known_templates) for s in world["roles"]["train"]]
    people = [{"prompt": t.format(s=s), "answer": world["facts"][s][r]}
              for s, k in known for r, (_, temps) in RELATIONS.items() for t in temps[:k]]
    return people + [{"prompt": t.format(s=s), "answer": o}
                     for r, (_, _, temps) in OBJECT_RELATIONS.items()
                     for s, o in world["object_facts"][r].items() for t in temps]


def write_world(cfg: WorldConfig, root: str | Path) -> dict[str, str]:
    """Generate (once; keyed by the settings) train.json, valid.json and facts.json under root."""
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    out = Path(root) / f"world-{key}"
    paths = {name: str(out / f"{name}.json") for name in ("train", "valid", "facts")}
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    world = build_world(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    locality = locality_pool(world, cfg.locality)
    if not locality:
        raise ValueError("data.world: the locality pool is empty (n_locality_subjects=0 with locality=people)")
    k = cfg.n_train_templates
    train = (_records(world, world["roles"]["train"], rng, slice(0, k), slice(0, k), locality, True)
             + _records(world, world["roles"]["novel"], rng, slice(0, k), slice(0, k), locality, False))
    train = [train[i] for i in rng.permutation(len(train))]
    valid = _records(world, world["roles"]["valid"], rng, slice(0, k), slice(k, None), locality, True)
    valid = [valid[i] for i in rng.permutation(len(valid))]
    # world.json first: the three record files mark a complete world (see the check above)
    atomic_write(out / "world.json", json.dumps({"config": asdict(cfg), **world}, indent=0))
    facts = pretraining_facts(world, cfg.n_train_known_templates)
    for name, rows in (("train", train), ("valid", valid), ("facts", facts)):
        atomic_write(paths[name], json.dumps(rows, indent=0))
    return paths

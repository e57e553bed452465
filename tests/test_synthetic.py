"""The synthetic world of the default experiment: deterministic, disjoint splits, zsRE-loadable."""
import json
from dataclasses import replace

from data.records import load_records
from data.synthetic import OBJECT_RELATIONS, RELATIONS, WorldConfig, build_world, write_world

SMALL = WorldConfig(n_train_subjects=8, n_valid_subjects=6, n_locality_subjects=5, n_novel_subjects=10,
                    locality="people", n_train_known_templates=4)


def test_world_is_a_function_of_its_settings(tmp_path):
    a, b = write_world(SMALL, tmp_path / "a"), write_world(SMALL, tmp_path / "b")
    for name in ("train", "valid", "facts"):
        assert open(a[name]).read() == open(b[name]).read()
    other = write_world(replace(SMALL, seed=1), tmp_path / "a")
    assert other["train"] != a["train"]  # another seed is another world, in its own directory
    assert open(other["train"]).read() != open(a["train"]).read()


def test_splits_do_not_overlap_and_locality_is_never_edited(tmp_path):
    paths = write_world(SMALL, tmp_path)
    train, valid = (json.loads(open(paths[k]).read()) for k in ("train", "valid"))
    world = json.loads(open(paths["train"].replace("train.json", "world.json")).read())
    roles = world["roles"]
    assert set(roles["train"]) | set(roles["novel"]) == {r["subject"] for r in train}
    assert set(roles["valid"]) == {r["subject"] for r in valid}
    edited = {r["subject"] for r in train + valid}
    assert not edited & set(roles["locality"])
    assert not {r["subject"] for r in train} & {r["subject"] for r in valid}
    assert len(train) == (SMALL.n_train_subjects + SMALL.n_novel_subjects) * len(RELATIONS)
    assert len(valid) == SMALL.n_valid_subjects * len(RELATIONS)
    for r in train + valid:  # unrelated tuples are true facts of locality subjects
        ls = next(s for s in roles["locality"] if s in r["loc"])
        assert r["loc_ans"] in world["facts"][ls].values()


def test_edits_are_new_objects_for_known_subjects(tmp_path):
    paths = write_world(SMALL, tmp_path)
    world = json.loads(open(paths["train"].replace("train.json", "world.json")).read())
    known = set(world["roles"]["train"]) | set(world["roles"]["valid"])
    assert known
    for name in ("train", "valid"):
        for r in json.loads(open(paths[name]).read()):
            true = world["facts"][r["subject"]][r["relation"]]
            assert (r["ans"] != true) if r["subject"] in known else (r["ans"] == true)


def test_gs_templates_are_held_out_from_meta_training(tmp_path):
    paths = write_world(SMALL, tmp_path)
    k = SMALL.n_train_templates

    def template(text, subject, relation):
        return next(i for i, t in enumerate(RELATIONS[relation][1]) if t.format(s=subject) == text)

    for r in json.loads(open(paths["train"]).read()):
        assert template(r["src"], r["subject"], r["relation"]) < k
        assert template(r["rephrase"], r["subject"], r["relation"]) < k
    for r in json.loads(open(paths["valid"]).read()):
        assert template(r["rephrase"], r["subject"], r["relation"]) >= k


def test_pretraining_facts_cover_known_subjects_only(tmp_path):
    paths = write_world(SMALL, tmp_path)
    facts = json.loads(open(paths["facts"]).read())
    world = build_world(SMALL)
    novel = world["roles"]["novel"]
    assert not any(s in f["prompt"] for f in facts for s in novel)
    n_known = SMALL.n_train_subjects + SMALL.n_valid_subjects + SMALL.n_locality_subjects
    n_object_facts = sum(len(world["object_facts"][r]) * len(t) for r, (_, _, t) in OBJECT_RELATIONS.items())
    assert len(facts) == n_known * sum(len(t) for _, t in RELATIONS.values()) + n_object_facts
    assert len(load_records(paths["train"], "zsre")) == len(json.loads(open(paths["train"]).read()))


def test_object_locality_asks_true_object_facts_no_edit_touches(tmp_path):
    cfg = replace(SMALL, locality="objects")
    paths = write_world(cfg, tmp_path)
    world = json.loads(open(paths["train"].replace("train.json", "world.json")).read())
    facts = {(t.format(s=s), o) for r, (_, _, temps) in OBJECT_RELATIONS.items() for t in temps
             for s, o in world["object_facts"][r].items()}
    pretrained = {(f["prompt"], f["answer"]) for f in json.loads(open(paths["facts"]).read())}
    rows = json.loads(open(paths["train"]).read()) + json.loads(open(paths["valid"]).read())
    people = set(world["facts"])
    for r in rows:
        assert (r["loc"], r["loc_ans"]) in facts & pretrained  # a true object fact the LM is trained on
        assert not any(p in r["loc"] for p in people)  # about no person, so about no edited subject
    capital = world["object_facts"]["capital"]
    assert all(world["object_facts"]["located_in"][c] == k for k, c in capital.items())
    assert len({r["loc"] for r in rows}) > 10  # drawn from the whole pool, not one question


def test_meta_training_subjects_can_be_taught_with_fewer_templates(tmp_path):
    cfg = replace(SMALL, n_train_known_templates=1)
    paths = write_world(cfg, tmp_path)
    world = json.loads(open(paths["train"].replace("train.json", "world.json")).read())
    prompts = [f["prompt"] for f in json.loads(open(paths["facts"]).read())]
    for role, k in (("train", 1), ("valid", 4), ("locality", 4)):
        for s in world["roles"][role]:
            for r, (_, temps) in RELATIONS.items():
                taught = [t.format(s=s) in prompts for t in temps]
                assert taught == [True] * k + [False] * (4 - k), (role, s, r)

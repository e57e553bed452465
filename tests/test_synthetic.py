"""The synthetic world of the default experiment: deterministic, disjoint splits, zsRE-loadable."""
import json
from dataclasses import replace

from data.records import load_records
from data.synthetic import RELATIONS, WorldConfig, build_world, write_world

SMALL = WorldConfig(n_train_subjects=8, n_valid_subjects=6, n_locality_subjects=5, n_novel_subjects=10)


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
    assert len(facts) == n_known * sum(len(t) for _, t in RELATIONS.values())
    assert len(load_records(paths["train"], "zsre")) == len(json.loads(open(paths["train"]).read()))

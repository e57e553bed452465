"""data=people: invented people with real-world facts (data/people.py). The files are a function of the settings,
train and validation people are disjoint, validation rephrases with a held-out template, and every unrelated
prompt is one SmolLM2 answers right before any edit."""
import json

import torch

from data.people import KNOWN, RELATIONS, PeopleConfig, write_people
from data.records import load_records
from pipeline.experiment import load


def test_people_are_deterministic_disjoint_and_rephrased_with_held_out_templates(tmp_path):
    cfg = PeopleConfig(n_train_subjects=20, n_valid_subjects=5)
    paths = write_people(cfg, tmp_path / "a")
    again = write_people(cfg, tmp_path / "b")
    for name in ("train", "valid"):
        assert open(paths[name]).read() == open(again[name]).read()
    train, valid = (json.loads(open(paths[n]).read()) for n in ("train", "valid"))
    assert (len(train), len(valid)) == (20 * len(RELATIONS), 5 * len(RELATIONS))
    assert not {r["subject"] for r in train} & {r["subject"] for r in valid}
    k = cfg.n_train_templates
    for rows, rephrase_from in ((train, slice(0, k)), (valid, slice(k, None))):
        for r in rows:
            objects, temps = RELATIONS[r["relation"]]
            assert r["ans"] in objects and (r["loc"], r["loc_ans"]) in KNOWN
            assert r["src"] in [t.format(s=r["subject"]) for t in temps[:k]]
            assert r["rephrase"] in [t.format(s=r["subject"]) for t in temps[rephrase_from]]
            assert r["rephrase"] != r["src"]
    assert len(load_records(paths["valid"], "zsre")) == len(valid)  # the zsRE reader takes them as they are
    other = json.loads(open(write_people(PeopleConfig(seed=1, n_train_subjects=20, n_valid_subjects=5),
                                         tmp_path / "c")["valid"]).read())
    assert other != valid


def test_smollm2_answers_every_unrelated_prompt_before_editing(smollm2):
    """The unrelated tuples are facts the model knows: LS is 1 before editing, token for token."""
    model, tok = load(smollm2)
    wrong = []
    for prompt, answer in KNOWN:
        q = tok(prompt, add_special_tokens=False).input_ids
        a = tok(" " + answer, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([q + a])).logits[0]
        if logits[len(q) - 1:-1].argmax(-1).tolist() != a:
            wrong.append((prompt, answer, tok.decode(logits[len(q) - 1:-1].argmax(-1))))
    assert not wrong, wrong

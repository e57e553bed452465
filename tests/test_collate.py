"""Tuples as the authors' runs fed them: a causal input stops before the last answer token, T5's
decoder labels carry no </s> (methods.md, "Where the paper is silent")."""
import torch

from data.collate import Collator
from model.lm import logits, nll
from pipeline.experiment import build_editor
from tests.helpers import build_model, make_cfg, one_group, qa_records


def test_causal_input_stops_before_the_last_answer_token():
    cfg = make_cfg("model=tiny-gpt2")
    _, tok = build_model(cfg)
    prompts, answers = ["Where is Paris?", "Who?"], ["In France", "Ada"]
    b = Collator(tok, "causal")(prompts, answers)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p_ids, a_ids = tok(p)["input_ids"], tok(" " + a)["input_ids"]
        n = len(p_ids) + len(a_ids) - 1
        assert b["attention_mask"][i].sum() == n
        assert b["input_ids"][i, :n].tolist() == p_ids + a_ids[:-1]
        # labels[t] is the token position t predicts: the answer, from the last prompt position on
        assert b["labels"][i, len(p_ids) - 1: n].tolist() == a_ids
        assert (b["labels"][i, : len(p_ids) - 1] == -100).all() and (b["labels"][i, n:] == -100).all()


def test_token_all_caches_prompt_plus_answer_minus_one_positions():
    cfg = make_cfg("model=tiny-gpt2", "editor.token=all", "data.n_edits=5", "data.batch_size=2", "editor.rank=8")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    records = qa_records(5)
    cache = build_editor(cfg, model).cache(one_group(cfg, tok, records).edit)
    expected = sum(len(tok(r.prompt)["input_ids"]) + len(tok(" " + r.answer)["input_ids"]) - 1 for r in records)
    for keys, grads in cache.values():  # the position after the answer, gradient exactly 0, is gone
        assert keys.shape[0] == grads.shape[0] == expected


def test_t5_labels_are_the_answer_tokens_without_eos():
    cfg = make_cfg("model=tiny-t5")
    model, tok = build_model(cfg)
    b = Collator(tok, "seq2seq")(["Where is Paris?", "Who?"], ["In France", "Ada"])
    for i, a in enumerate(["In France", "Ada"]):
        a_ids = tok(a, add_special_tokens=False)["input_ids"]
        n = len(a_ids)
        assert tok.eos_token_id not in b["labels"][i].tolist()
        assert b["labels"][i, :n].tolist() == a_ids and (b["labels"][i, n:] == -100).all()
        assert b["decoder_input_ids"][i, :n].tolist() == [tok.pad_token_id] + a_ids[:-1]  # start + answer[:-1]
        assert b["decoder_attention_mask"][i].sum() == n
    assert torch.isfinite(nll(logits(model, b, "seq2seq"), b, "seq2seq")).all()

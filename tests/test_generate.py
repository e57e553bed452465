"""Scores by generation (model/generate.py): greedy decoding's exact match beside teacher forcing, and
"unchanged" locality, on models whose every prediction is set by hand, and against transformers' `generate`."""
import pytest
import torch

from data.records import EditRecord
from editor.base import apply_shifts
from model.generate import greedy, unchanged
from pipeline.experiment import evaluate
from tests.helpers import build_model, fever_records, make_cfg, one_group, varied_records

SCALE = 10.0  # the logit of a designed next token; every other token's is 0: the argmax is never a tie


def bigram_llama():
    """A tiny Llama whose next-token prediction depends on the last input token alone, as set by `teach`: every
    block adds nothing (o_proj and down_proj are zero), so the final hidden state is the normalised embedding of
    the last token. A token of `rows` gets its own basis direction; every other token shares the last one."""
    cfg = make_cfg("model=tiny-llama", "model.tiny.tie_word_embeddings=false")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, -1] = 1.0  # the shared direction of tokens without a row
    model.eval()
    return model, tok


class Bigram:
    """Sets which token follows which in `bigram_llama`: teach(prev, next) makes `next` the argmax after `prev`."""

    def __init__(self, model, tok):
        self.model, self.tok, self.rows = model, tok, {}

    def id(self, ch: str) -> int:
        """The token of one character (" " is the byte-level "Ġ")."""
        ids = self.tok(ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, ch
        return ids[0]

    def teach(self, prev: str | int, nxt: str | int) -> None:
        p, n = (self.id(x) if isinstance(x, str) else x for x in (prev, nxt))
        with torch.no_grad():
            if p not in self.rows:
                self.rows[p] = len(self.rows)
                assert self.rows[p] < self.model.config.hidden_size - 1
                emb = self.model.model.embed_tokens.weight
                emb[p].zero_()
                emb[p, self.rows[p]] = 1.0
            self.model.lm_head.weight[:, self.rows[p]] = 0.0
            self.model.lm_head.weight[n, self.rows[p]] = SCALE


def taught():
    """The hand-set model of the tests below. Answers are 2 tokens, " " and a letter ("Ġ", "x": byte-level).
    Edit prompts end in A, B, C; their rephrasings in D, E, F; unrelated prompts in G, H, I, J.
      A -> z (wrong), z -> z; Ġ -> x              answer " x": teacher forcing 1/2 (the x is right after the gold
                                                   Ġ); generation "zz", a miss
      B -> Ġ -> x                                  answer " x": both 1
      C -> Ġ -> x                                  answer " y": teacher forcing 1/2, generation " x", a miss
      D, E, F as A, B, C
      G -> Ġ, H -> q -> q, I -> r -> r             unrelated, answers " w": continuations " x", "qq", "rr"
      J -> <|endoftext|>                           generation stops at once: continuation [eos]"""
    model, tok = bigram_llama()
    b = Bigram(model, tok)
    for prev, nxt in [("A", "z"), ("z", "z"), (" ", "x"), ("B", " "), ("C", " "), ("D", "z"), ("E", " "),
                      ("F", " "), ("G", " "), ("H", "q"), ("q", "q"), ("I", "r"), ("r", "r"),
                      ("J", tok.eos_token_id)]:
        b.teach(prev, nxt)
    records = [EditRecord(prompt="edit" + "!" * i + f" {p}", answer=a, equiv_prompts=("again" * i + f" {e}",),
                          unrel_prompt="other" + "?" * (3 * i) + f" {u}", unrel_answer="w")  # lengths differ: padding
               for i, (p, e, u, a) in enumerate([("A", "D", "G", "x"), ("B", "E", "H", "x"), ("C", "F", "I", "y"),
                                                 ("B", "E", "J", "x")])]
    cfg = make_cfg("model=tiny-llama", "data.n_edits=4", "data.batch_size=2")
    return model, tok, b, one_group(cfg, tok, records)


def test_generation_and_teacher_forcing_disagree_as_worked_out_by_hand():
    model, tok, b, group = taught()
    scores, seconds = evaluate(model, group, "causal", "cpu", generate=True)
    # edit tuples A, B, C, B: teacher forcing 1/2, 1, 1/2, 1; generation 0, 1, 0, 1
    assert scores["ES"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    assert scores["generated"]["ES"] == pytest.approx(2 / 4)
    assert scores["GS"] == pytest.approx(3 / 4) and scores["generated"]["GS"] == pytest.approx(2 / 4)
    # unrelated answers " w": the Ġ after G is right (1/2), nothing else; no continuation is " w"
    assert scores["LS"] == pytest.approx(0.5 / 4) and scores["generated"]["LS"] == 0.0
    assert scores["generated"]["unchanged"] == 1.0 and seconds > 0
    eos, ids = tok.eos_token_id, {c: b.id(c) for c in " xqr"}
    by_tuple = dict(zip(group.order["unrel"], scores["unrel_greedy"]))  # batch order -> group position
    assert by_tuple == {0: [ids[" "], ids["x"]], 1: [ids["q"]] * 2, 2: [ids["r"]] * 2, 3: [eos]}


def test_unchanged_counts_the_one_unrelated_prompt_an_edit_changes():
    model, tok, b, group = taught()
    before, _ = evaluate(model, group, "causal", "cpu", generate=True)
    # a shift of the output head after "q" alone: H's continuation becomes "qs"; G, I and J keep theirs
    delta = torch.zeros_like(model.lm_head.weight)
    delta[b.id("s"), b.rows[b.id("q")]] = 2 * SCALE
    with apply_shifts(model, {"lm_head.weight": delta}):
        after, _ = evaluate(model, group, "causal", "cpu", generate=True, before=before["unrel_greedy"])
        per_tuple = unchanged(model, group.unrel, "causal", "cpu", before["unrel_greedy"])
        assert greedy(model, group.unrel, "causal", "cpu")[group.order["unrel"].index(1)] == [b.id("q"), b.id("s")]
    assert after["generated"]["unchanged"] == pytest.approx(3 / 4)
    assert dict(zip(group.order["unrel"], per_tuple.tolist())) == {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}
    assert after["ES"] == before["ES"] and after["LS"] == before["LS"]  # the edit touched no answer here


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_teacher_forced_exact_match_is_what_generate_decodes(model_name):
    """On random models, the continuation that transformers' `generate` decodes (left-padded batches, KV
    cache) is an exact match under teacher forcing, and a continuation with one token changed is not."""
    cfg = make_cfg(f"model={model_name}", "data.n_edits=12", "data.batch_size=5")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    model.eval()
    group = one_group(cfg, tok, varied_records(12))  # prompts of many lengths: every batch is padded
    for batches in (group.edit, group.unrel):
        decoded = greedy(model, batches, cfg.model.family, "cpu")
        lengths = [n for bt in batches for n in (bt["labels"] != -100).sum(1).tolist()]
        eos = model.config.eos_token_id
        assert all(len(c) == n or (c[-1] == eos and len(c) <= n) for c, n in zip(decoded, lengths))
        assert unchanged(model, batches, cfg.model.family, "cpu", decoded).tolist() == [1.0] * len(decoded)
        other = [c[:-1] + [(c[-1] + 1) % model.config.vocab_size] for c in decoded]
        assert unchanged(model, batches, cfg.model.family, "cpu", other).tolist() == [0.0] * len(decoded)


def test_the_classifier_generates_its_label_once():
    """FEVER: generation is the argmax label, what ES/GS/LS measure; `generated` repeats them, and unchanged
    compares labels before and after."""
    cfg = make_cfg("model=tiny-bert", "data=fever", "data.n_edits=6", "data.batch_size=4")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    model.eval()
    group = one_group(cfg, tok, fever_records(6))
    before, _ = evaluate(model, group, "classifier", "cpu", generate=True)
    assert {k: before["generated"][k] for k in ("ES", "GS", "LS")} == {k: before[k] for k in ("ES", "GS", "LS")}
    flip = {n: -2 * p.detach() for n, p in model.named_parameters() if n.startswith("head.")}
    with apply_shifts(model, flip):  # the head negated: every label flips
        after, _ = evaluate(model, group, "classifier", "cpu", generate=True, before=before["unrel_greedy"])
    assert after["generated"]["unchanged"] == 0.0
    assert after["LS"] == pytest.approx(1 - before["LS"])

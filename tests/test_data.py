"""Tests for data/: collation and edit grouping (record loading: tests/test_records.py)."""
from __future__ import annotations

import itertools
import logging

import pytest
import torch

from data.collate import Collator
from data.groups import edit_groups, n_groups
from data.records import DataError, EditRecord, load_records
from tests.helpers import SHARED, fever_dev_rows, need_shared, write_json

GPT2 = SHARED / "gpt2-tokenizer"


@pytest.fixture(scope="module")
def gpt2():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(need_shared(GPT2)))
    tok.pad_token = tok.eos_token  # as the model code does for GPT-2
    return tok


def _byte_tokenizer(specials: list[str], template: str, **names):
    """Offline byte-level BPE (no merges) with the given special tokens first in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    used = [s for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


@pytest.fixture(scope="module")
def t5_like():
    return _byte_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def bert_like():
    return _byte_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
                           pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


# ---------------------------------------------------------------- collation

def test_causal_gpt2_labels(gpt2, zsre_records):
    col = Collator(gpt2, "causal")
    for start in range(0, 400, 50):
        recs = zsre_records[start: start + 50]
        b = col([r.prompt for r in recs], [r.answer for r in recs])
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 50
        for i, r in enumerate(recs):
            ans = labels[i] != -100  # positions that predict an answer token
            assert gpt2.decode(labels[i][ans]) == " " + r.answer
            n_prompt = int(ans.nonzero()[0]) + 1  # the last prompt token predicts the first answer token
            assert gpt2.decode(ids[i][:n_prompt]) == r.prompt  # answer follows the prompt directly
            n_real = int(mask[i].sum())
            # input prompt + answer[:-1]: position t predicts the label at t, the input token at t + 1
            assert n_real == n_prompt + int(ans.sum()) - 1
            assert torch.equal(ids[i, n_prompt:n_real], labels[i][ans][:-1])
            assert mask[i, :n_real].all() and not mask[i, n_real:].any()  # right padding
            assert (labels[i, n_real:] == -100).all() and (ids[i, n_real:] == gpt2.pad_token_id).all()
            assert ans.nonzero()[-1] == n_real - 1  # the last input position predicts the last answer token


def test_causal_refusals(gpt2):
    col = Collator(gpt2, "causal")
    for prompts, answers in ((["Q?"], [""]), (["Q?"], ["   "]), ([""], ["a"]), (["Q?", "R?"], ["a"])):
        with pytest.raises(ValueError):
            col(prompts, answers)
    from transformers import AutoTokenizer
    no_pad = AutoTokenizer.from_pretrained(str(GPT2))
    with pytest.raises(ValueError, match="pad"):
        Collator(no_pad, "causal")
    with pytest.raises(ValueError, match="family"):
        Collator(gpt2, "encoder")


def test_too_long_is_refused(t5_like, gpt2):
    old = t5_like.model_max_length
    t5_like.model_max_length = 16
    try:
        col = Collator(t5_like, "seq2seq")
        col(["x" * 15], ["y"])  # 15 bytes + </s> = 16 tokens: fits exactly
        with pytest.raises(ValueError, match=r"17 tokens, longer than the tokenizer limit 16"):
            col(["x" * 16], ["y"])
    finally:
        t5_like.model_max_length = old


def test_seq2seq_batch(t5_like, zsre_records):
    recs = zsre_records[:40]
    b = Collator(t5_like, "seq2seq")([r.prompt for r in recs], [r.answer for r in recs])
    pad, eos = t5_like.pad_token_id, t5_like.eos_token_id
    labels, dec_in, dec_mask = b["labels"], b["decoder_input_ids"], b["decoder_attention_mask"]
    assert labels.shape == dec_in.shape == dec_mask.shape
    for i, r in enumerate(recs):
        n_in = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, n_in - 1] == eos
        assert t5_like.decode(b["input_ids"][i, : n_in - 1]) == r.prompt
        n = int((labels[i] != -100).sum())
        assert eos not in labels[i].tolist() and t5_like.decode(labels[i, :n]) == r.answer  # no </s> label
        assert (labels[i, n:] == -100).all()
        assert dec_in[i, 0] == pad  # T5 decoder start token
        assert torch.equal(dec_in[i, 1:n], labels[i, : n - 1])  # shifted right by one
        assert (dec_in[i, n:] == pad).all()
        assert dec_mask[i, :n].all() and not dec_mask[i, n:].any()


def test_classifier_batch(bert_like, tmp_path):
    recs = load_records(write_json(tmp_path / "f.json", fever_dev_rows(30)), "fever")
    b = Collator(bert_like, "classifier")([r.prompt for r in recs], [r.answer for r in recs])
    assert b["labels"].dtype == torch.float32 and b["labels"].shape == (30,)
    assert b["labels"].tolist() == [1.0 if r.answer else 0.0 for r in recs]
    cls, sep = bert_like.cls_token_id, bert_like.sep_token_id
    for i, r in enumerate(recs):
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, 0] == cls and b["input_ids"][i, n - 1] == sep
        assert bert_like.decode(b["input_ids"][i, 1: n - 1]) == r.prompt
        assert (b["input_ids"][i, n:] == bert_like.pad_token_id).all()
    with pytest.raises(ValueError, match="bool"):
        Collator(bert_like, "classifier")(["claim"], ["SUPPORTS"])


# ---------------------------------------------------------------- groups

class _Counting:
    """Collator wrapper that counts calls, to observe laziness."""

    def __init__(self, inner: Collator):
        self.inner, self.calls = inner, 0

    def __call__(self, prompts, answers):
        self.calls += 1
        return self.inner(prompts, answers)

    def lengths(self, prompts, answers):  # the length sort before batching: not a batch
        return self.inner.lengths(prompts, answers)


def _answers(tok, batches) -> list[str]:
    return [tok.decode(row[row != -100]) for b in batches for row in b["labels"]]


def _prompts(tok, batches) -> list[str]:
    """Causal batches: the prompt ends at the first position that predicts an answer token."""
    return [tok.decode(ids[: int((lab != -100).nonzero()[0]) + 1])
            for b in batches for ids, lab in zip(b["input_ids"], b["labels"])]


def test_groups_cover_every_tuple(gpt2, zsre_records):
    col = _Counting(Collator(gpt2, "causal"))
    recs = zsre_records[:35]
    groups = edit_groups(recs, 10, 3, col, seed=0, shuffle=True)
    assert col.calls == 0  # nothing tokenised before iteration
    first = next(groups)
    assert col.calls == sum(len(b) for b in (first.edit, first.equiv, first.unrel))  # one group, only now
    out = [first, *groups]
    assert len(out) == n_groups(35, 10) == 3
    seen = []
    for g in out:
        assert len(g.records) == 10
        for batches in (g.edit, g.equiv, g.unrel):  # at most 3 tuples and 3 x the mean length per batch
            assert sum(b["input_ids"].shape[0] for b in batches) == 10
            mean = sum(int(b["attention_mask"].sum()) for b in batches) / 10
            assert all(b["input_ids"].shape[0] <= 3 and b["input_ids"].numel() <= 3 * mean for b in batches)
        # every (prompt, answer) tuple exactly once, in length-sorted batches (data/groups.py)
        pairs = lambda batches: sorted(zip(_prompts(gpt2, batches), _answers(gpt2, batches)))  # noqa: E731
        assert pairs(g.edit) == sorted((r.prompt, " " + r.answer) for r in g.records)
        assert pairs(g.equiv) == sorted((r.equiv_prompts[0], " " + r.answer) for r in g.records)
        assert pairs(g.unrel) == sorted((r.unrel_prompt, " " + r.unrel_answer) for r in g.records)
        for batches in (g.edit, g.equiv, g.unrel):
            lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
            assert lengths == sorted(lengths)
        seen += g.records
    assert len(set(map(id, seen))) == 30 and all(r in recs for r in seen)


def test_groups_deterministic(gpt2, zsre_records):
    col = Collator(gpt2, "causal")
    recs = zsre_records[:60]
    runs = [list(edit_groups(recs, 20, 8, col, seed=s, shuffle=True)) for s in (3, 3, 4)]
    order = [[r.prompt for g in run for r in g.records] for run in runs]
    assert order[0] == order[1] and order[0] != order[2]
    assert sorted(order[0]) == sorted(r.prompt for r in recs) != order[0]  # a permutation, not the file order
    for g0, g1 in zip(runs[0], runs[1]):
        for b0, b1 in zip(g0.edit + g0.equiv + g0.unrel, g1.edit + g1.equiv + g1.unrel):
            assert all(torch.equal(b0[k], b1[k]) for k in b0)
    unshuffled = [r for g in edit_groups(recs, 20, 64, col, seed=3, shuffle=False) for r in g.records]
    assert unshuffled == recs


def test_validation_groups_shuffled_by_seed(t5_like):
    # validate() shuffles by cfg.seed: the same seed repeats its groups (and its max_valid_steps prefix),
    # another seed edits other records, so the std over seeds covers the choice of edits
    recs = [EditRecord(f"p{i}", f"a{i}", (f"e{i}_0", f"e{i}_1"), f"u{i}", f"ua{i}") for i in range(40)]
    col = Collator(t5_like, "seq2seq")

    def groups(seed, steps=None):
        out = itertools.islice(edit_groups(recs, 8, 3, col, seed=seed, shuffle=True), steps)
        return [(g.records, [{k: v.tolist() for k, v in b.items()} for b in g.edit + g.equiv + g.unrel])
                for g in out]

    a = groups(0)
    assert a == groups(0) and groups(0, steps=2) == a[:2]
    assert [r for g, _ in a for r in g] != recs  # not the file order
    b = groups(1)
    assert [r for g, _ in b for r in g] != [r for g, _ in a for r in g]
    assert set(map(id, a[0][0])) != set(map(id, b[0][0]))  # the first group holds other edits


def test_groups_equiv_choice(t5_like):
    recs = [EditRecord(f"p{i}", f"a{i}", tuple(f"e{i}_{j}" for j in range(4)), f"u{i}", f"ua{i}") for i in range(40)]
    col = Collator(t5_like, "seq2seq")

    def chosen(seed):
        out = []
        for g in edit_groups(recs, 8, 5, col, seed=seed, shuffle=False):
            for b in g.equiv:
                for ids, m in zip(b["input_ids"], b["attention_mask"]):
                    out.append(t5_like.decode(ids[: int(m.sum()) - 1]))
        return out

    a, b = chosen(0), chosen(1)
    assert a == chosen(0) and a != b
    assert all(c in r.equiv_prompts for c, r in zip(a, recs))
    assert len({c.split("_")[1] for c in a}) > 1  # not always the first rephrasing


def test_groups_remainder_warning(gpt2, zsre_records, caplog):
    with caplog.at_level(logging.WARNING, logger="data.groups"):
        groups = list(edit_groups(zsre_records, 64, 64, _Counting(Collator(gpt2, "causal")), seed=0, shuffle=False))
    assert len(groups) == 1000 // 64
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{1000 - 64 * len(groups)} records beyond the last full group of 64" in warnings[0]


def test_groups_too_few_records(gpt2, zsre_records):
    with pytest.raises(DataError, match=r"^data/x\.json: has 5 records, fewer than data.n_edits=6$"):
        edit_groups(zsre_records[:5], 6, 2, Collator(gpt2, "causal"), seed=0, shuffle=True, path="data/x.json")

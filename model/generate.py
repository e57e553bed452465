"""Scores by generation beside the teacher-forced ones: greedy decoding, and locality as "unchanged".

The teacher-forced scores (ES, GS, LS: model/lm.accuracy) give each answer token partial credit, read with
the gold tokens before it fed in. A model that must produce the answer itself gets no such help: a tuple is a
success only when greedy decoding from its prompt, for as many new tokens as the target has (stopping early at
the model's end-of-sequence token), gives the target's tokens exactly (MeG, arXiv 2512.14395: "AG"; WILD, arXiv
2502.11177). Whitespace and case are those of the teacher-forced scores: the target is the token ids of
" " + answer.strip() (causal; the answer's ids for seq2seq) as data/collate.py makes them, compared id for id,
so a generated "paris" or a differently split " Par" "is" is a miss.

How each score is computed, and why that is greedy decoding:
- ES_gen, GS_gen, LS_gen: from the logits of the teacher-forced pass, with no second pass (model/lm.exact).
  Greedy decoding emits each answer token as the argmax after the tokens before it; as long as it has been
  right, those are the gold tokens, so its answer equals the target iff every teacher-forced argmax does. The
  same logits give both scores, from the prefix states (model/prefix.py) where they apply.
  tests/test_generate.py checks this against transformers' `generate` (batched, KV cache).
- unchanged: the share of unrelated prompts whose greedy continuation after the edit, at the length of their
  answer, is token for token the one before it. Before the edit the continuation is decoded for real
  (`greedy`: left-padded batches, `generate` with its KV cache; stored with the pre-edit scores,
  pipeline/pre_edit.py); after it, by the same induction, "unchanged" is `exact` on the tuple (prompt, that
  continuation): one teacher-forced pass, from the prefix states.
- The FEVER classifier (family classifier) has no generation: its prediction is the argmax label, which is
  what ES, GS and LS already measure, so ES_gen, GS_gen and LS_gen are those values, not computed again, and
  "unchanged" is the share of unrelated claims whose predicted label the edit left as it was.
"""
import torch
from torch import nn

from data.collate import IGNORE, _pad
from model.lm import answer_hits, answer_mask, logits, to_device

GENERATED = ("ES", "GS", "LS", "unchanged")  # results.json: final.generated, pre_edit.generated, valid[i].generated


def _eos_ids(model: nn.Module) -> list[int]:
    """The model's end-of-sequence token id(s): its generation config's, else its config's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _prompts(batch: dict, family: str) -> list[list[int]]:
    """The prompt token ids of each tuple of a causal batch: the input up to the first answer position."""
    first = answer_mask(batch, family).int().argmax(1)  # (B,) the position that predicts answer token 1
    return [row[: int(f) + 1].tolist() for row, f in zip(batch["input_ids"], first)]


def _cut(tokens: list[int], n: int, eos: list[int]) -> list[int]:
    """The first n tokens, ended after the first end-of-sequence token (decoding stops there)."""
    tokens = tokens[:n]
    stop = next((i for i, t in enumerate(tokens) if t in eos), None)
    return tokens if stop is None else tokens[: stop + 1]


@torch.no_grad()
def greedy(model: nn.Module, batches: list[dict], family: str, device) -> list[list[int]]:
    """Each tuple's greedy continuation of its prompt, as many new tokens as its answer has (stopping after an
    end-of-sequence token), in batch order; transformers' `generate`, batched, with its KV cache. For the
    classifier: the predicted label, 1 or 0, as a one-item list."""
    if family == "classifier":
        return [[int(v > 0)] for b in batches for v in logits(model, to_device(b, device), family).tolist()]
    eos = _eos_ids(model)
    pad = next(x for x in (model.config.pad_token_id, *eos, 0) if x is not None)  # masked: its value is never read
    out = []
    for b in batches:
        n = answer_mask(b, family).sum(1).tolist()  # (B,) answer tokens of each tuple
        kw = dict(max_new_tokens=max(n), do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad,
                  eos_token_id=eos or None, temperature=None, top_p=None, top_k=None)
        if family == "causal":  # decoder-only: left-padded prompts, so that every row continues at the end
            prompts = _prompts(b, family)
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            new = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:]  # (B, max n)
        else:  # seq2seq: the encoder input as it is; the decoder from its start token
            start = int(b["decoder_input_ids"][0, 0])
            new = model.generate(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                                 decoder_start_token_id=start, **kw)[:, 1:]
        out += [_cut(row, k, eos) for row, k in zip(new.tolist(), n)]
    return out


def with_answers(batch: dict, family: str, answers: list[list[int]]) -> dict:
    """The batch with each tuple's answer replaced by the given token ids (its prompt kept), laid out as
    data/collate.py lays out a batch: causal input prompt + answer[:-1], labels aligned to the positions that
    predict them; seq2seq decoder input start + answer[:-1]."""
    if family == "causal":
        prompts = _prompts(batch, family)
        ids, mask = _pad([p + a[:-1] for p, a in zip(prompts, answers)], 0)
        labels = _pad([[IGNORE] * (len(p) - 1) + a for p, a in zip(prompts, answers)], IGNORE)[0]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    start = int(batch["decoder_input_ids"][0, 0])
    labels, dec_mask = _pad(answers, IGNORE)
    dec_in = _pad([[start] + a[:-1] for a in answers], start)[0]
    return {**{k: batch[k] for k in ("input_ids", "attention_mask")}, "labels": labels,
            "decoder_input_ids": dec_in, "decoder_attention_mask": dec_mask}


def unchanged(model: nn.Module, batches: list[dict], family: str, device, before: list[list[int]],
              prefix=None) -> torch.Tensor:
    """(N,) 1.0 where the model's greedy continuation of a tuple's prompt is `before` (its continuation before
    the edit, from `greedy`), token for token; one teacher-forced pass (model/lm.exact), through `prefix`."""
    if family == "classifier":
        return torch.tensor([float(a == b) for a, b in zip(greedy(model, batches, family, device), before)])
    out, start = [], 0
    for b in batches:
        n = b["input_ids"].shape[0]
        out.append(answer_hits(model, [with_answers(b, family, before[start: start + n])], family, device,
                               prefix)[1])
        start += n
    return torch.cat(out)

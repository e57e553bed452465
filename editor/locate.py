"""What MEMIT and EMMET share: the last subject token, the keys there, and the target vectors z.

A request is one edit (prompt, subject, answer). Every prompt is also read after a few short
prefixes, and keys and hidden states at the last subject token are averaged over these contexts,
so that the edit does not rely on the prompt opening the text (MEMIT). MEMIT samples its prefixes
from the model; offline and deterministic, ours are the first words of texts drawn from the
key-statistics sample (training prompts and NQ questions, or wikitext).

z lives in the residual stream after the block of the last critical layer. It is reached by adding
delta to the output of that block's edited module (the FFN output projection), which GPT-2 and
GPT-J add to the residual stream as is.
"""
import re
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.collate import Collator
from data.records import DataError, EditRecord
from model.lm import logits, logits_at, nll, to_device


@dataclass(frozen=True)
class Request:
    """One edit; `end` is the character index just past the subject's first mention in `prompt`."""

    prompt: str
    subject: str
    answer: str | bool
    end: int


def requests(records: list[EditRecord], path: str, editor: str) -> list[Request]:
    """The records as requests; DataError naming file, record and field if a subject cannot be located."""
    out = []
    for r in records:
        if r.subject is None:
            raise DataError(path, r.index, "subject", f"missing: {editor} edits at the last token of the subject, "
                            "which the MEND/MEMIT zsRE format gives ({subject, src, ...}); this record has none")
        end = subject_end(r.prompt, r.subject.strip())
        if end is None:
            raise DataError(path, r.index, "subject", f"{r.subject!r} does not occur in the prompt {r.prompt!r}, "
                            f"so {editor} cannot find its last token")
        out.append(Request(r.prompt, r.subject.strip(), r.answer, end))
    return out


def subject_end(prompt: str, subject: str) -> int | None:
    """End of the subject's first mention in `prompt`: as a whole word, else as a substring, else ignoring
    case ("the Beatles" in "The Beatles ..."); None if absent. The subject is also looked for in its NFC
    and NFD forms (a composed "ý" or "y" + combining acute), and the end takes in any combining marks
    that follow, so it never splits a character from its accents."""
    forms = list(dict.fromkeys([subject] + [unicodedata.normalize(f, subject) for f in ("NFC", "NFD")]))
    for whole_word, flags in ((True, 0), (False, 0), (True, re.IGNORECASE), (False, re.IGNORECASE)):
        for form in forms:
            for found in re.finditer(re.escape(form), prompt, flags):
                start, end = found.span()
                if whole_word and not (_boundary(prompt, start - 1) and _boundary(prompt, end)):
                    continue
                while end < len(prompt) and unicodedata.category(prompt[end]).startswith("M"):
                    end += 1  # combining marks belong to the character before them
                return end
    return None


def _boundary(text: str, i: int) -> bool:
    """Whether text[i] does not continue a word (letters, digits, _ and combining marks do)."""
    return not 0 <= i < len(text) or not (text[i].isalnum() or text[i] == "_"
                                         or unicodedata.category(text[i]).startswith("M"))


def make_prefixes(texts: list[str], n_prefixes: int, n_words: int, seed: int = 0) -> list[str]:
    """The empty prefix and `n_prefixes` openings of `n_words` words of texts drawn from `texts`."""
    picks = np.random.default_rng(seed).choice(len(texts), min(n_prefixes, len(texts)), replace=False)
    return [""] + [" ".join(texts[i].split()[:n_words]).rstrip(".?!,;:") + ". " for i in picks]


def contexts(reqs: list[Request], prefixes: list[str]) -> tuple[list[str], list[int]]:
    """Every prompt after every prefix (request-major: row i * P + j) and the subject's end in each."""
    texts = [p + r.prompt for r in reqs for p in prefixes]
    ends = [len(p) + r.end for r in reqs for p in prefixes]
    return texts, ends


def encode(tokenizer, texts: list[str], ends: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded input_ids, attention_mask (B, T), tokenised as the Collator tokenises prompts, and
    the last subject token (B,): the LAST token covering character ends[i] - 1. A character can span
    several tokens (byte-level BPE splits a multi-byte "ý" into two); the first of them lies inside
    the subject, so `char_to_token` (which gives the first) is not used."""
    enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt",
                    return_offsets_mapping=tokenizer.is_fast)
    if enc["input_ids"].shape[1] > tokenizer.model_max_length:
        raise ValueError(f"a prompt is longer than the tokenizer limit {tokenizer.model_max_length}")
    pos = []
    for i, (text, end) in enumerate(zip(texts, ends)):
        if tokenizer.is_fast:
            starts = enc["offset_mapping"][i, :, 0][enc["attention_mask"][i].bool()]  # (T_i,) first char of each token
            covering = (starts < end).nonzero()  # tokens are in text order: the last one starting before `end`
            t = int(covering[-1]) if len(covering) else None
        else:  # no offsets: count the tokens of the text up to the subject's end
            t = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1
        if t is None:
            raise ValueError(f"no token holds the end of the subject in {text!r}")
        pos.append(t)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(pos)


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # GPT-J blocks return a tuple, GPT-2 blocks a tensor


@torch.no_grad()
def subject_states(model: nn.Module, tokenizer, texts: list[str], ends: list[int], modules: dict[str, nn.Module],
                   block: nn.Module, batch_size: int, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """At the last subject token of each text: the input of each module (keys, (N, d_in) each) and
    the output of `block` (hidden states (N, d)), in float32."""
    seen = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0]))
               for n, m in modules.items()]
    handles.append(block.register_forward_hook(lambda mod, inp, out: seen.__setitem__(None, _first(out))))
    keys, hidden = {n: [] for n in modules}, []
    try:
        for i in range(0, len(texts), batch_size):
            batch, pos = encode(tokenizer, texts[i: i + batch_size], ends[i: i + batch_size])
            model(**to_device(batch, device))
            rows = torch.arange(len(pos))  # CPU indices index a tensor on any device (modules may sit on several)
            for n in modules:
                keys[n].append(seen[n][rows, pos].float().to(device))  # (b, d_in)
            hidden.append(seen[None][rows, pos].float().to(device))  # (b, d)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(k) for n, k in keys.items()}, torch.cat(hidden)


@contextmanager
def added_at(module: nn.Module, rows: torch.Tensor, pos: torch.Tensor, vectors: torch.Tensor):
    """Within the block, `module`'s output gets vectors[k] added at (rows[k], pos[k]) (differentiably)."""
    def hook(mod, inp, out):
        at = (rows.to(out.device), pos.to(out.device))  # the module's device (model.device_map)
        return out + torch.zeros_like(out).index_put(at, vectors.to(out.device, out.dtype))
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def target_vectors(model: nn.Module, tokenizer, reqs: list[Request], prefixes: list[str], block: nn.Module,
                   inject: nn.Module, *, n_steps: int, lr: float, kl_coef: float, norm_coef: float,
                   clamp_factor: float, batch_size: int, device) -> torch.Tensor:
    """z = h + delta (n, d) after `block` at the last subject token, h averaged over the prefixes.

    delta minimises, by `n_steps` of Adam, the answer's mean token NLL over the prefixed prompts
    + kl_coef KL(p || p_delta) of the next token after "{subject} is a" (keeps the subject's other
    properties) + norm_coef (|delta| / |h|)^2, and is clamped to |delta| <= clamp_factor |h|.
    Requests are independent (the loss is a sum and Adam acts per coordinate), so they are solved
    `batch_size` at a time with the same result.
    """
    z = [_targets(model, tokenizer, reqs[i: i + batch_size], prefixes, block, inject, n_steps, lr, kl_coef,
                  norm_coef, clamp_factor, device)
         for i in tqdm(range(0, len(reqs), batch_size), desc="MEMIT targets", leave=False, dynamic_ncols=True)]
    return torch.cat(z)


def _targets(model, tokenizer, reqs, prefixes, block, inject, n_steps, lr, kl_coef, norm_coef, clamp_factor,
             device) -> torch.Tensor:
    b, n_pre = len(reqs), len(prefixes)
    texts, ends = contexts(reqs, prefixes)
    _, h = subject_states(model, tokenizer, texts, ends, {}, block, len(texts), device)
    h = h.view(b, n_pre, -1).mean(1)  # (b, d)
    batch = to_device(Collator(tokenizer, "causal")(texts, [r.answer for r in reqs for _ in prefixes]), device)
    _, pos = encode(tokenizer, texts, ends)  # the Collator tokenises prompts the same way
    n_answer = (batch["labels"] != -100).sum(1)  # (b * P,)
    owner = torch.arange(b * n_pre, device=device) // n_pre  # request of each row
    kl_batch, kl_pos = encode(tokenizer, [f"{r.subject} is a" for r in reqs], [len(r.subject) for r in reqs])
    kl_batch = to_device(kl_batch, device)
    rows, last = torch.arange(b, device=device), kl_batch["attention_mask"].sum(1) - 1
    at_last = torch.zeros_like(kl_batch["attention_mask"], dtype=torch.bool)
    at_last[rows, last] = True  # (b, T) the position after "is a"
    with torch.no_grad():
        ref = logits_at(model, kl_batch, "causal", at_last).float().log_softmax(-1)  # (b, V)

    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    all_rows, pos, kl_pos = torch.arange(b * n_pre, device=device), pos.to(device), kl_pos.to(device)
    for _ in range(n_steps):
        with added_at(inject, all_rows, pos, delta[owner]):
            answer = (nll(logits(model, batch, "causal"), batch, "causal") / n_answer).view(b, n_pre).mean(1)
        with added_at(inject, rows, kl_pos, delta):
            logp = logits_at(model, kl_batch, "causal", at_last).float().log_softmax(-1)
        kl = (ref.exp() * (ref - logp)).sum(-1)  # (b,)
        reg = (delta.norm(dim=-1) / h.norm(dim=-1)) ** 2
        loss = (answer + kl_coef * kl + norm_coef * reg).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            limit = clamp_factor * h.norm(dim=-1, keepdim=True)
            delta.mul_((limit / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))
    return h + delta.detach()

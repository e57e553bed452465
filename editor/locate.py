"""What MEMIT and EMMET share: the last subject token, the keys there, and the target vectors z.

A request is one edit (prompt, subject, answer). MEMIT reads every prompt in P = 1 + n_prefixes
contexts: the bare prompt, and the prompt after each of 5 short texts that the model itself
generates (10 tokens sampled from the starts "The", "Therefore", "Because", "I", "You") and ". ".
The texts are sampled once per model with seed 0 and cached (`context_prefixes`). A key is the mean
of two group means, the bare prompt's and the prefixed prompts' (`template_mean`): the bare prompt
weighs one half.

z = h + delta lives in the residual stream after the block of the last critical layer, at the last
subject token of the bare prompt (h). delta is added to the output of that block's edited module
(the FFN output projection), which GPT-2, GPT-J and Llama add to the residual stream as is, at the
last subject token of every context and of the prompt "{subject} is a". Per request it minimises
(`TargetLoss`)
    mean over the P contexts of the answer's mean token NLL
    + kl_coef KL(p_delta || p) of the next token at the last subject token of "{subject} is a"
    + norm_coef |delta| / |h|^2
by Adam, clamps |delta| <= clamp_factor |h| after each step, and stops once its loss is under
stop_loss (`optimise_targets`).
"""
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from data.collate import IGNORE, Collator
from data.subjects import Request
from editor.stats import cached_path, vocab_digest
from model.lm import logits_at, nll, to_device
from util import atomic_write


def generate_prefixes(model: nn.Module, tokenizer, starts: list[str], n_tokens: int, top_k: int, seed: int,
                      device) -> list[str]:
    """One text per start: the start's tokens continued to `n_tokens` tokens in all, each sampled from
    the `top_k` most likely next tokens (special tokens excluded) with a torch.Generator seeded by
    `seed`. A start that the vocabulary cannot read (the toy model's word-level vocabulary has no
    "Therefore") is replaced by the BOS token (else EOS), which the text then leaves out. Whitespace
    runs become one space."""
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    texts = []
    for start in starts:
        ids = tokenizer(start, add_special_tokens=False)["input_ids"]
        drop = int(not ids or tokenizer.unk_token_id in ids)  # leading tokens that are not text
        ids = torch.tensor([[bos] if drop else ids], device=device)  # (1, t)
        while ids.shape[1] < n_tokens + drop:
            last = torch.zeros_like(ids, dtype=torch.bool)
            last[0, -1] = True
            with torch.no_grad():
                lg = logits_at(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "causal", last)
            lg = lg[0].float().cpu().index_fill(0, special, -float("inf"))  # (V,)
            top = lg.topk(min(top_k, int(torch.isfinite(lg).sum())))
            pick = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]  # (1,)
            ids = torch.cat([ids, pick[None].to(device)], 1)
        texts.append(" ".join(tokenizer.decode(ids[0, drop:], skip_special_tokens=True).split()))
    return texts


def context_prefixes(model: nn.Module, tokenizer, *, n_prefixes: int, starts: list[str], n_tokens: int,
                     top_k: int, model_id: str, cache_dir: str | Path, device, seed: int = 0) -> list[str]:
    """The P = 1 + n_prefixes prefixes of MEMIT's contexts: "" (the bare prompt) and, for i < n_prefixes,
    a text generated from starts[i % len(starts)] followed by ". " (" " if the vocabulary has no "."),
    cached in cache_dir/context_prefixes/<model>/ under a key of everything they depend on."""
    if n_prefixes <= 0:
        return [""]
    wanted = [starts[i % len(starts)] for i in range(n_prefixes)]
    key = {"model": model_id, "dtype": str(next(model.parameters()).dtype), "vocab_sha256": vocab_digest(tokenizer),
           "starts": wanted, "n_tokens": n_tokens, "top_k": top_k, "seed": seed}
    path = cached_path(cache_dir, "context_prefixes", key, f"n{n_prefixes}", ".json")
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is None or saved.get("key") != key:  # the digest names the key; this guards against a collision
        saved = {"key": key, "texts": generate_prefixes(model, tokenizer, wanted, n_tokens, top_k, seed, device)}
        atomic_write(path, json.dumps(saved, indent=1, ensure_ascii=False))
    dot = tokenizer(".", add_special_tokens=False)["input_ids"]
    dot = bool(dot) and (tokenizer.unk_token_id is None or tokenizer.unk_token_id not in dot)
    return [""] + [t + (". " if dot else " ") for t in saved["texts"]]


def template_mean(x: torch.Tensor) -> torch.Tensor:
    """(n, P, d) values in the P contexts of n requests -> (n, d): the mean of the bare prompt's value
    (context 0) and of the mean over the prefixed contexts; with P = 1, the bare prompt's."""
    return x[:, 0] if x.shape[1] == 1 else (x[:, 0] + x[:, 1:].mean(1)) / 2


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


class _Stop(Exception):
    """Ends a forward pass once the hooked modules have run: nothing after them is read."""


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> float32; float64 kept


@torch.no_grad()
def subject_states(model: nn.Module, tokenizer, texts: list[str], ends: list[int], modules: dict[str, nn.Module],
                   block: nn.Module, batch_size: int, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """At the last subject token of each text: the input of each module (keys, (N, d_in) each) and
    the output of `block` (hidden states (N, d)), in float32 (float64 for a float64 model). Each
    forward pass stops after `block` (the modules lie at or below it)."""
    seen = {}

    def record(name):
        def hook(mod, inp, out):
            seen[name] = _first(out) if name is None else inp[0]
            if len(seen) == len(modules) + 1:
                raise _Stop
        return hook
    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    handles.append(block.register_forward_hook(record(None)))
    keys, hidden = {n: [] for n in modules}, []
    try:
        for i in range(0, len(texts), batch_size):
            batch, pos = encode(tokenizer, texts[i: i + batch_size], ends[i: i + batch_size])
            seen.clear()
            try:
                model(**to_device(batch, device))
            except _Stop:
                pass
            rows = torch.arange(len(pos))  # CPU indices index a tensor on any device (modules may sit on several)
            for n in modules:
                keys[n].append(_upcast(seen[n][rows, pos]).to(device))  # (b, d_in)
            hidden.append(_upcast(seen[None][rows, pos]).to(device))  # (b, d)
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


class Suffixes:
    """Sequences (R, T), right-padded, whose rows change only from position pos[r] on (delta is added there,
    and attention is causal): the tokens before pos[r] run once, and their keys and values are kept; each
    call runs only the rest, against them. Same logits as the whole sequence, at a fraction of the cost.

    The prefixes are right-padded to c = max(pos) and the suffixes to S = max(length - pos); positions
    are given explicitly, and the padding between a row's prefix and its suffix is masked out."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pos: torch.Tensor,
                 device):
        self.model, lengths, pos = model, attention_mask.sum(1).cpu(), pos.cpu()
        n, c, s = len(pos), int(pos.max()), int((lengths - pos).max())
        pre_ids, pre_mask = torch.zeros(n, c, dtype=torch.long), torch.zeros(n, c, dtype=torch.long)
        self.ids, mask = torch.zeros(n, s, dtype=torch.long), torch.zeros(n, s, dtype=torch.long)
        for r, (p, length) in enumerate(zip(pos.tolist(), lengths.tolist())):
            pre_ids[r, :p], pre_mask[r, :p] = input_ids[r, :p], 1
            self.ids[r, :length - p], mask[r, :length - p] = input_ids[r, p:length], 1
        self.mask = torch.cat([pre_mask, mask], 1)  # (R, c + S) over cached and new positions
        self.positions = pos[:, None] + torch.arange(s)  # (R, S)
        self.suffix = mask.bool()  # (R, S)
        self.pos, self.past = pos, None
        if c:
            head = model.get_output_embeddings()  # no logits are read here: the head sees no position
            handle = head.register_forward_pre_hook(lambda m, args: (args[0][:, :0],) + args[1:])
            try:
                with torch.no_grad():
                    out = model(input_ids=pre_ids.to(device), attention_mask=pre_mask.to(device),
                                position_ids=torch.arange(c).expand(n, c).to(device), use_cache=True)
            finally:
                handle.remove()
            keep = pre_mask.bool().to(device)[:, None, :, None]  # padding's keys and values: zero, never NaN
            self.past = [(layer.keys.where(keep.to(layer.keys.device), 0), layer.values.where(keep.to(
                layer.values.device), 0)) for layer in out.past_key_values.layers]  # (R, heads, c, d_head) each
        self.device = device

    def cut(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (R, T) aligned with the sequences, as (R, S) aligned with the suffixes (IGNORE-padded)."""
        out = torch.full(self.ids.shape, IGNORE, dtype=labels.dtype)
        for r, p in enumerate(self.pos.tolist()):
            width = min(self.ids.shape[1], labels.shape[1] - p)
            out[r, :width] = labels[r, p: p + width].cpu()
        return out

    def logits(self, rows: torch.Tensor, at: torch.Tensor, inject: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of rows `rows` (a,) at the N suffix positions where at (a, S) is True, row-major,
        with delta (a, d) added to `inject`'s output at each row's first suffix position (pos[r])."""
        past = (DynamicCache([(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.past])
                if self.past is not None else None)
        with added_at(inject, torch.arange(len(rows)), torch.zeros(len(rows), dtype=torch.long), delta):
            head = self.model.get_output_embeddings()
            handle = head.register_forward_pre_hook(lambda m, args: (args[0][at.to(args[0].device)],) + args[1:])
            try:
                return self.model(input_ids=self.ids[rows].to(self.device),
                                  attention_mask=self.mask[rows].to(self.device),
                                  position_ids=self.positions[rows].to(self.device), past_key_values=past,
                                  use_cache=past is not None).logits
            finally:
                handle.remove()


class TargetLoss:
    """MEMIT's loss of delta (b, d), what b requests add to h to make z = h + delta, term by term per request.

    Built once per batch of requests on the unedited model: h (b, d), the output of `block` at the last
    subject token of each bare prompt; the P contexts of each request with its answer (row i * P + j)
    and the prompts "{subject} is a" up to their last subject token, each as `Suffixes` split at the
    last subject token; the model's own next-token log-probabilities there (b, V)."""

    def __init__(self, model: nn.Module, tokenizer, reqs: list[Request], prefixes: list[str], block: nn.Module,
                 inject: nn.Module, device):
        self.inject, self.n_ctx = inject, len(prefixes)
        texts, ends = contexts(reqs, prefixes)
        _, self.h = subject_states(model, tokenizer, texts[::self.n_ctx], ends[::self.n_ctx], {}, block,
                                   len(reqs), device)  # (b, d) at the bare prompts
        batch = Collator(tokenizer, "causal")(texts, [r.answer for r in reqs for _ in prefixes])  # (b * P, T)
        _, pos = encode(tokenizer, texts, ends)  # (b * P,) the Collator tokenises prompts the same way
        before = (batch["labels"] != IGNORE) & (torch.arange(batch["labels"].shape[1]) < pos[:, None])  # (b * P, T)
        if before.any():  # cannot happen: the subject lies in the prompt, the answer after it
            raise ValueError("MEMIT: an answer token is predicted before the last subject token")
        self.ctx = Suffixes(model, batch["input_ids"], batch["attention_mask"], pos, device)
        self.labels = self.ctx.cut(batch["labels"])  # (b * P, S)
        self.n_answer = (self.labels != IGNORE).sum(1)  # (b * P,)
        kl_batch, kl_pos = encode(tokenizer, [f"{r.subject} is a" for r in reqs], [len(r.subject) for r in reqs])
        upto = (torch.arange(kl_batch["input_ids"].shape[1]) <= kl_pos[:, None]).long()  # (b, T'): only up to it
        self.kl = Suffixes(model, kl_batch["input_ids"], upto, kl_pos, device)  # suffix: the one token
        with torch.no_grad():
            self.ref = self._kl_logp(torch.zeros_like(self.h), torch.arange(len(reqs)))  # (b, V)

    def _kl_logp(self, delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """log p(next token | "{subject} is a" up to the last subject token), delta added there: (a, V)."""
        return _upcast(self.kl.logits(rows, self.kl.suffix[rows], self.inject, delta)).log_softmax(-1)

    def __call__(self, delta: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms (a,) of the requests `rows` (a,), CPU indices, whose deltas are delta (a, d):
        nll (mean over contexts of the answer's mean token NLL), kl (KL(p_delta || p)), reg (|delta| / |h|^2)."""
        ctx = (rows[:, None] * self.n_ctx + torch.arange(self.n_ctx)).flatten()  # (a * P,) request-major
        labels = self.labels[ctx]  # (a * P, S)
        lg = self.ctx.logits(ctx, labels != IGNORE, self.inject, delta.repeat_interleave(self.n_ctx, 0))
        token_mean = nll(lg, {"labels": labels}, "causal") / self.n_answer[ctx].to(lg.device)  # (a * P,)
        logp = self._kl_logp(delta, rows)  # (a, V)
        kl = (logp.exp() * (logp - self.ref[rows.to(self.ref.device)])).sum(-1)
        h = self.h[rows.to(self.h.device)]
        return {"nll": token_mean.view(len(rows), self.n_ctx).mean(1), "kl": kl,
                "reg": delta.norm(dim=-1) / h.norm(dim=-1) ** 2}


def optimise_targets(loss_fn: TargetLoss, *, n_steps: int, lr: float, kl_coef: float, norm_coef: float,
                     clamp_factor: float, stop_loss: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """delta (b, d) of each request by MEMIT's loop: at most `n_steps` losses, each followed by an Adam
    step, except the last and any under `stop_loss`, after which that request's delta is final; then
    |delta| <= clamp_factor |h|. Requests are independent (the loss is a sum, Adam acts per coordinate,
    a finished request's delta is restored after each step), so any batch of them gives each the same
    delta. Also, per request (b,) on the CPU: `steps`, the number of losses it took; `loss` and `nll`,
    the total loss and the answer's NLL term at its final delta. One read-back per step."""
    h = loss_fn.h
    delta = torch.zeros_like(h, requires_grad=True)  # (b, d), float32 (float64 for a float64 model)
    opt = torch.optim.Adam([delta], lr=lr)
    limit = clamp_factor * h.norm(dim=-1, keepdim=True)  # (b, 1)
    done, steps = torch.zeros(len(h), dtype=torch.bool), torch.zeros(len(h), dtype=torch.long)  # CPU
    last = torch.zeros(2, len(h), dtype=torch.float64)  # (loss, nll) at each request's latest delta, CPU
    for step in range(n_steps):
        rows = (~done).nonzero()[:, 0]  # (a,) CPU
        terms = loss_fn(delta[rows.to(delta.device)], rows)
        loss = terms["nll"] + kl_coef * terms["kl"] + norm_coef * terms["reg"]  # (a,)
        last[:, rows] = torch.stack([loss, terms["nll"]]).detach().double().cpu()  # the one read-back of the step
        under = last[0, rows] < stop_loss
        steps[rows] += 1
        done[rows[under]] = True
        if step == n_steps - 1 or done.all():
            break
        opt.zero_grad(set_to_none=True)
        loss[~under.to(loss.device)].sum().backward()
        final = done.to(delta.device)
        kept = delta.detach()[final]
        opt.step()
        with torch.no_grad():
            delta[final] = kept  # Adam's momentum would move them: a finished request stays as it stopped
            delta.mul_((limit / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))
    return delta.detach(), {"steps": steps, "loss": last[0], "nll": last[1]}


def target_vectors(model: nn.Module, tokenizer, reqs: list[Request], prefixes: list[str], block: nn.Module,
                   inject: nn.Module, *, n_steps: int, lr: float, kl_coef: float, norm_coef: float,
                   clamp_factor: float, stop_loss: float, batch_size: int, device, store=None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """z = h + delta (n, d) after `block` at the last subject token of each bare prompt, `batch_size`
    requests at a time, and per request (n,) on the CPU: steps, loss and nll (`optimise_targets`) and
    delta_ratio = |delta| / |h| (at most clamp_factor, up to the float32 rounding of the clamp).
    `store` (editor/target_store.TargetStore): requests already in it are not optimised again; the others
    are stored as each batch of them finishes."""
    done = [store.get(r) if store is not None else None for r in reqs]  # per request: its values, or None
    todo = [i for i, v in enumerate(done) if v is None]
    for start in tqdm(range(0, len(todo), batch_size), desc="MEMIT targets", leave=False, dynamic_ncols=True):
        rows = todo[start: start + batch_size]
        loss_fn = TargetLoss(model, tokenizer, [reqs[i] for i in rows], prefixes, block, inject, device)
        delta, terms = optimise_targets(loss_fn, n_steps=n_steps, lr=lr, kl_coef=kl_coef, norm_coef=norm_coef,
                                        clamp_factor=clamp_factor, stop_loss=stop_loss)
        # in float64, so that the ratio carries only the clamp's own float32 rounding, not that of its measure
        terms["delta_ratio"] = (delta.double().norm(dim=-1) / loss_fn.h.double().norm(dim=-1)).cpu()
        terms["z"] = loss_fn.h + delta  # (b, d)
        for j, i in enumerate(rows):
            done[i] = {k: v[j] for k, v in terms.items()}
            if store is not None:
                store.put(reqs[i], done[i])
    z = torch.stack([v["z"] for v in done]).to(device)  # (n, d)
    return z, {k: torch.stack([v[k] for v in done]).cpu() for k in ("steps", "loss", "nll", "delta_ratio")}

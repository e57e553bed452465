"""Forward passes, losses and metrics of the three model families on one LM batch.

Batches come from `data.collate.Collator`:
  causal      input_ids, attention_mask, labels (B, T): labels[t] is the answer token that position t
              predicts, -100 elsewhere (the input is prompt + answer[:-1])
  seq2seq     input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels (B, Td)
  classifier  input_ids, attention_mask, labels (B,) in {0., 1.}

`logits` computes the output head only where a loss or metric reads it: at the N answer positions
(N, V), not at all B * T positions (for GPT-2 on zsRE about a fifth of the tokens).
Every loss is per example (B,), summed over its answer tokens, so that callers can sum over any
split into batches and divide by a total of the whole group (examples or answer tokens,
`answer_tokens`): the result does not depend on the batch size.
"""
import torch
import torch.nn.functional as F
from torch import nn

INPUTS = {
    "causal": ("input_ids", "attention_mask"),
    "seq2seq": ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
    "classifier": ("input_ids", "attention_mask"),
}


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Move every tensor of a batch to `device`."""
    return {k: v.to(device) for k, v in batch.items()}


def _forward(model: nn.Module, batch: dict, family: str, params: dict | None, prefix=None):
    """The model's output on a batch, `params` overriding named parameters; with a `prefix`
    (model/prefix.PrefixStates) the blocks below the first edited one run once per tuple."""
    inputs = {k: batch[k] for k in INPUTS[family]}

    def call(**kwargs):
        if params:
            return torch.func.functional_call(model, params, args=(), kwargs=kwargs, strict=False)
        return model(**kwargs)
    return call(**inputs) if prefix is None else prefix.run(call, inputs)


def logits_at(model: nn.Module, batch: dict, family: str, mask: torch.Tensor, params: dict | None = None,
              prefix=None) -> torch.Tensor:
    """Logits (N, V) of an LM at the N positions where `mask` (B, T) is True, row-major (as `h[mask]`).

    The model runs as it is (its own modules, `params` overriding named parameters), but its output
    head (`get_output_embeddings()`: lm_head) reads only the selected hidden states: a forward
    pre-hook gathers them. For T5 `mask` is on the decoder side. Whatever the model does before its
    head (T5's rescaling) and after it (Gemma's soft-capping) still happens; the vocabulary projection
    and everything downstream cost N rows instead of B * T."""
    head = model.get_output_embeddings()

    def gather(module, args):
        return (args[0][mask.to(args[0].device)],) + tuple(args[1:])  # (B, T, d) -> (N, d)
    handle = head.register_forward_pre_hook(gather)
    try:
        return _forward(model, batch, family, params, prefix).logits
    finally:
        handle.remove()


def logits(model: nn.Module, batch: dict, family: str, params: dict | None = None, prefix=None) -> torch.Tensor:
    """The logits that losses and metrics read: (N, V) at the batch's N answer positions (`answer_mask`,
    row-major) for LMs, (B,) for the classifier; `params` overrides named parameters; `prefix`: a
    model/prefix.PrefixStates, or None to run the whole model."""
    if family == "classifier":
        return _forward(model, batch, family, params, prefix)
    return logits_at(model, batch, family, answer_mask(batch, family), params, prefix)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to float32 for softmax; float32/float64 kept (the gradient checks run in float64)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def answer_mask(batch: dict, family: str) -> torch.Tensor:
    """(B, T) positions whose output is an answer: they predict an answer token (the first token
    for the classifier). For seq2seq this is on the decoder side."""
    if family == "classifier":
        mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        mask[:, 0] = True
        return mask
    return batch["labels"] != -100


def answer_tokens(batches: list[dict], family: str) -> int:
    """Answer tokens in a list of batches (one per example for the classifier): the denominator of
    the token-mean losses (editor.loss_reduction=token_mean)."""
    return sum(int(answer_mask(b, family).sum()) for b in batches)


def per_example(values: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """Sum (B,) of per-answer-token values (N,) (in `logits` order) over each example's answer tokens."""
    mask = answer_mask(batch, family)
    rows = mask.nonzero()[:, 0].to(values.device)  # (N,) the example of each answer token
    return values.new_zeros(mask.shape[0]).index_add(0, rows, values)


def _targets(batch: dict, family: str, device) -> torch.Tensor:
    """(N,) the answer tokens that the N answer positions predict (labels are aligned, data.collate)."""
    labels = batch["labels"]
    return labels[labels != -100].to(device)


def nll(lg: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """-log p(y | x) per example (B,) from `logits`: summed over answer tokens (binary CE for the classifier)."""
    if family == "classifier":
        return F.binary_cross_entropy_with_logits(_upcast(lg), batch["labels"].to(_upcast(lg).dtype),
                                                  reduction="none")
    token_nll = F.cross_entropy(_upcast(lg), _targets(batch, family, lg.device), reduction="none")  # (N,)
    return per_example(token_nll, batch, family)


def kl(ref: torch.Tensor, lg: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """KL(p_ref || p) per example (B,) from two `logits`, summed over answer positions (Bernoulli for
    the classifier)."""
    if family == "classifier":
        ref, lg = _upcast(ref), _upcast(lg)
        ref_logp = torch.stack([F.logsigmoid(ref), F.logsigmoid(-ref)], -1)  # (B, 2)
        logp = torch.stack([F.logsigmoid(lg), F.logsigmoid(-lg)], -1)
        return (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    ref_logp, logp = _upcast(ref).log_softmax(-1), _upcast(lg).log_softmax(-1)  # (N, V)
    token_kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (N,)
    return per_example(token_kl, batch, family)


def accuracy(lg: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """Per-example success (B,) from `logits`: teacher-forced token accuracy on the answer (binary for
    FEVER); NaN where the logits that decide it are not finite (argmax over NaN would count as a miss)."""
    if family == "classifier":
        hit = ((lg > 0).float() == batch["labels"].float()).float()
        return hit.where(torch.isfinite(lg), torch.nan)
    hits = (lg.argmax(-1) == _targets(batch, family, lg.device)).float()  # (N,)
    bad = (~torch.isfinite(lg).all(-1)).float()  # (N,) answer positions with a non-finite logit
    count = per_example(torch.ones_like(hits), batch, family)
    return (per_example(hits, batch, family) / count.clamp(min=1)).where(per_example(bad, batch, family) == 0,
                                                                          torch.nan)


class MetricError(ValueError):
    """A success rate that cannot be computed: it is never reported or written as a number."""


def exact(lg: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """Per-example (B,) 1.0 when EVERY answer token is the argmax given the gold tokens before it, else 0.0
    (NaN where `accuracy` is NaN). This is greedy generation's exact match: greedy decoding emits answer token
    1 as the argmax after the prompt; if it is right, its next input is the gold token, so it emits token 2 as
    the argmax after prompt + gold token 1, and so on. By induction the generated answer equals the target
    token for token iff every teacher-forced argmax does (an end-of-sequence token emitted early is an argmax
    that differs from the target's token, a miss either way). The classifier's generation is its label."""
    acc = accuracy(lg, batch, family)
    return acc if family == "classifier" else (acc == 1).to(acc).where(~acc.isnan(), torch.nan)


@torch.no_grad()
def answer_hits(model: nn.Module, batches: list[dict], family: str, device,
                prefix=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example teacher-forced token accuracy (`accuracy`) and greedy generation's exact match (`exact`) over
    a list of batches, both (N,) in batch order, from one forward pass per batch; MetricError if the model's
    outputs on any tuple are not finite. `prefix`: as `logits`."""
    tf, ag = [], []
    for b in (to_device(b, device) for b in batches):  # each batch moved once; one read back at the end
        lg = logits(model, b, family, prefix=prefix)
        tf.append(accuracy(lg, b, family))
        ag.append(exact(lg, b, family))
    tf, ag = torch.cat(tf).cpu(), torch.cat(ag).cpu()
    if tf.isnan().any():
        dtype = next(model.parameters()).dtype
        raise MetricError(f"the model's outputs are not finite (inf or NaN) on {int(tf.isnan().sum())} of "
                          f"{len(tf)} tuples, so ES/GS/LS cannot be computed (a {dtype} forward pass that "
                          "overflows, or non-finite weights); nothing is reported as a number")
    return tf, ag


def success(model: nn.Module, batches: list[dict], family: str, device, prefix=None) -> torch.Tensor:
    """Per-example teacher-forced success over a list of batches, concatenated (N,) (`answer_hits`)."""
    return answer_hits(model, batches, family, device, prefix)[0]


@torch.no_grad()
def answer_log_prob(model: nn.Module, batches: list[dict], family: str, device, prefix=None,
                    reduction: str = "sum") -> torch.Tensor:
    """log P(answer | prompt) of each tuple (N,), in batch order: the sum of the answer tokens'
    log-probabilities (the probability of the whole answer), or their mean with reduction="mean" (per
    token, as ROME's released CounterFact evaluation). Causal and seq2seq LMs; NaN where not finite."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    out = []
    for b in (to_device(b, device) for b in batches):
        lp = -nll(logits(model, b, family, prefix=prefix), b, family)  # (B,)
        if reduction == "mean":
            lp = lp / answer_mask(b, family).sum(1).to(lp)
        out.append(lp.where(torch.isfinite(lp), torch.nan))
    return torch.cat(out).cpu()


COUNTERFACT_SCORES = {  # score: (the tuples that should win, the tuples they are compared with)
    "efficacy": ("edit", "edit_true"),        # P(new | edit prompt) > P(true | edit prompt)
    "paraphrase": ("equiv", "equiv_true"),    # P(new | rephrasing) > P(true | rephrasing)
    "neighborhood": ("unrel", "unrel_new"),   # P(true | neighborhood prompt) > P(new | neighborhood prompt)
}


def counterfact_scores(model: nn.Module, group, family: str, device, prefix=None,
                       reduction: str = "sum") -> dict[str, float]:
    """CounterFact's efficacy, paraphrase and neighborhood scores of the model as it is now on one group
    (data.groups.EditGroup with `counter`): the share of tuples whose right answer is the more probable
    one, P(a | p) = exp(answer_log_prob), over whole multi-token answers (Meng et al. 2022, ROME, Sec. 3.1
    "efficacy score", "paraphrase score", "neighborhood score"; reported so by MEMIT and AlphaEdit).
    MetricError when a log-probability is not finite (never reported as a number)."""
    lp = {}
    for kind in ("edit", "equiv", "unrel", *group.counter):
        batches = getattr(group, kind) if kind in ("edit", "equiv", "unrel") else group.counter[kind]
        values = answer_log_prob(model, batches, family, device, prefix, reduction)  # (m,) in batch order
        if values.isnan().any():
            raise MetricError(f"log P(answer) is not finite on {int(values.isnan().sum())} of {len(values)} "
                              f"{kind} tuples: the CounterFact scores cannot be computed")
        lp[kind] = values.new_empty(len(values)).index_copy_(0, torch.tensor(group.order[kind]), values)
    return {name: float((lp[win] > lp[lose]).double().mean()) for name, (win, lose) in COUNTERFACT_SCORES.items()}

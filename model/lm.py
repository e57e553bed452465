"""Forward passes, losses and metrics of the three model families on one LM batch.

Batches come from `data.collate.Collator`:
  causal      input_ids, attention_mask, labels (B, T): labels[t] is the answer token that position t
              predicts, -100 elsewhere (the input is prompt + answer[:-1])
  seq2seq     input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels (B, Td)
  classifier  input_ids, attention_mask, labels (B,) in {0., 1.}

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


def logits(model: nn.Module, batch: dict, family: str, params: dict | None = None) -> torch.Tensor:
    """Logits (B, T, V) for LMs, (B,) for the classifier; `params` overrides named parameters."""
    inputs = {k: batch[k] for k in INPUTS[family]}
    if params:
        out = torch.func.functional_call(model, params, args=(), kwargs=inputs, strict=False)
    else:
        out = model(**inputs)
    return out if family == "classifier" else out.logits


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to float32 for softmax; float32/float64 kept (the gradient checks run in float64)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _targets(lg: torch.Tensor, batch: dict, family: str):
    """Logits (B, T, V), the answer tokens they predict (B, T) and the mask of answer positions (B, T)."""
    labels = batch["labels"]  # aligned with the predicting positions (data.collate)
    return _upcast(lg), labels.clamp(min=0), labels != -100


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


def nll(lg: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """-log p(y | x) per example (B,): summed over answer tokens (binary CE for the classifier)."""
    if family == "classifier":
        return F.binary_cross_entropy_with_logits(_upcast(lg), batch["labels"].to(_upcast(lg).dtype),
                                                  reduction="none")
    lg, targets, mask = _targets(lg, batch, family)
    token_nll = -lg.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T')
    return (token_nll * mask).sum(-1)


def kl(ref: torch.Tensor, lg: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """KL(p_ref || p) per example (B,), summed over answer positions (Bernoulli for the classifier)."""
    if family == "classifier":
        ref, lg = _upcast(ref), _upcast(lg)
        ref_logp = torch.stack([F.logsigmoid(ref), F.logsigmoid(-ref)], -1)  # (B, 2)
        logp = torch.stack([F.logsigmoid(lg), F.logsigmoid(-lg)], -1)
        return (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    ref, _, mask = _targets(ref, batch, family)
    lg, _, _ = _targets(lg, batch, family)
    ref_logp, logp = ref.log_softmax(-1), lg.log_softmax(-1)  # (B, T', V)
    token_kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (B, T')
    return (token_kl * mask).sum(-1)


def accuracy(lg: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    """Per-example success (B,): teacher-forced token accuracy on the answer (binary for FEVER); NaN
    where the logits that decide it are not finite (argmax over NaN would count as a miss, i.e. 0)."""
    if family == "classifier":
        hit = ((lg > 0).float() == batch["labels"].float()).float()
        return hit.where(torch.isfinite(lg), torch.nan)
    lg, targets, mask = _targets(lg, batch, family)
    hits = (lg.argmax(-1) == targets) & mask
    finite = (torch.isfinite(lg).all(-1) | ~mask).all(-1)  # (B,) every answer position has finite logits
    return (hits.sum(-1).float() / mask.sum(-1).clamp(min=1)).where(finite, torch.nan)


class MetricError(ValueError):
    """A success rate that cannot be computed: it is never reported or written as a number."""


@torch.no_grad()
def success(model: nn.Module, batches: list[dict], family: str, device) -> torch.Tensor:
    """Per-example success over a list of batches, concatenated (N,); MetricError if the model's
    outputs on any tuple are not finite."""
    out = torch.cat([accuracy(logits(model, to_device(b, device), family), to_device(b, device), family).cpu()
                     for b in batches])
    if out.isnan().any():
        dtype = next(model.parameters()).dtype
        raise MetricError(f"the model's outputs are not finite (inf or NaN) on {int(out.isnan().sum())} of "
                          f"{len(out)} tuples, so ES/GS/LS cannot be computed (a {dtype} forward pass that "
                          "overflows, or non-finite weights); nothing is reported as a number")
    return out

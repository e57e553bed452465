"""Trace keys u and value gradients dL/dv of the edited linear layers (paper Alg. 1).

A linear layer maps key u (its input) to value v (its output). For nn.Linear the weight is
(d_out, d_in); GPT-2's Conv1D stores it transposed, (d_in, d_out), but its input and output are
still key and value, so tracing is identical and only the shift must be transposed (editor.base).

The edit loss is the SUM of the answer tokens' cross-entropies, not a mean over the group: one edit's
(key, value-gradient) pairs then depend on nothing but that edit, whatever m, the other edits of its group
and data.batch_size (tests/test_trace.py checks it token by token). The authors' runs take each fixed-size
LM batch's token mean (32 edits on zsRE): their value gradients are these divided by that batch's answer
tokens (about 87 with GPT-2 tokens), a near-constant factor that the hyper-network's input normaliser
removes (editor/hypernet.py). A mean over the whole group instead shrinks every input as 1/m (docs/implementation_notes.md).
"""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from model.lm import answer_mask, logits, nll, to_device


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv1D module."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


def token_mask(batch: dict, family: str, module_name: str, token: str) -> torch.Tensor:
    """(B, T) tokens whose (key, value-gradient) pairs are cached for this module.

    token="ans": the tokens that output the answer (paper default); "all": every non-padding token.
    T5 encoder modules see only encoder tokens, none of which outputs the answer, so they always
    cache every non-padding encoder token.
    """
    if family == "seq2seq":
        if module_name.startswith("encoder."):
            return batch["attention_mask"].bool()
        return answer_mask(batch, family) if token == "ans" else batch["decoder_attention_mask"].bool()
    if token == "ans":
        return answer_mask(batch, family)
    if token == "all":
        return batch["attention_mask"].bool()
    raise ValueError(f"editor.token must be 'ans' or 'all', got {token!r}")


def trace(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict], family: str,
          token: str, device, cache_device, dtype: torch.dtype = torch.float32, prefix=None
          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the edit tuples, back-propagate L = -sum_i log p(y_i | x_i) (summed over every answer token:
    independent of the group, see above), and return per module keys (n, d_in) and value gradients
    (n, d_out) of the selected tokens, in `dtype` on `cache_device`. `prefix`: model/prefix.PrefixStates or None."""
    keys = {n: [] for n in modules}
    grads = {n: [] for n in modules}
    for batch in batches:
        batch = to_device(batch, device)
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
                 for n, m in modules.items()]
        # Fresh leaf weights that require grad make the module outputs part of the graph while the
        # model's own parameters stay frozen.
        params = {f"{n}.weight": m.weight.detach().requires_grad_() for n, m in modules.items()}
        try:
            lg = logits(model, batch, family, params, prefix)
        finally:
            for h in hooks:
                h.remove()
        loss = nll(lg, batch, family).sum()
        names = list(modules)
        value_grads = torch.autograd.grad(loss, [seen[n][1] for n in names])
        for n, g in zip(names, value_grads):
            mask = token_mask(batch, family, n, token).to(g.device)  # (B, T) on the module's device (device_map)
            keys[n].append(seen[n][0][mask].detach().to(cache_device, dtype))  # (n_b, d_in)
            grads[n].append(g[mask].to(cache_device, dtype))  # (n_b, d_out)
    return {n: (torch.cat(keys[n]), torch.cat(grads[n])) for n in modules}

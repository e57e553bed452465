"""MEMIT (Meng et al., ICLR 2023): mass editing of causal LMs at the last subject token, in closed form.

1. Target vectors z_i: the hidden state after the last critical layer L, at the last subject token,
   that makes the model answer (editor.locate.target_vectors).
2. For each critical layer l, in order, with the updates of the earlier layers applied: keys
   K_l = inputs of the FFN output projection at the last subject token (d_in, n), residual
   R = (z - h_L) / (number of layers left) (d_out, n), and
       Delta_l = R K_l^T (lambda C_l + K_l K_l^T)^{-1},   C_l = E[k k^T] over generic text,
   solved with torch.linalg.solve. Spreading R over the layers keeps each layer's change small.
"""
import logging
from pathlib import Path

import torch
from torch import nn

from editor.base import Editor, Shifts, apply_shifts, to_param_layout
from editor.locate import contexts, make_prefixes, requests, subject_states, target_vectors
from editor.stats import key_second_moments, model_fingerprint, sample_texts
from model.load import resolve_modules

log = logging.getLogger(__name__)


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """Delta = R K^T (lam C + K K^T)^{-1} (d_out, d_in) for keys K (d_in, n), residuals R (d_out, n), C (d_in, d_in)."""
    a = lam * cov + keys @ keys.T  # (d_in, d_in), symmetric, so Delta a = R K^T  <=>  a Delta^T = K R^T
    return torch.linalg.solve(a, keys @ resid.T).T


class MEMIT(Editor):
    """MEMIT on a causal LM; no meta-training. Keys' statistics are computed (or loaded) at construction."""

    name = "memit"

    def __init__(self, model: nn.Module, family: str, tokenizer, *, layers: list[int], module: str, lam: float,
                 n_steps: int, lr: float, kl_coef: float, norm_coef: float, clamp_factor: float, n_prefixes: int,
                 prefix_words: int, batch_size: int, stats_texts: list[str], stats_source: str, n_samples: int,
                 stats_max_len: int, stats_batch_size: int, cache_dir: str | Path, model_id: str | None,
                 device="cpu"):
        if family != "causal":
            raise ValueError(f"editor {self.name} edits causal LMs (GPT-2, GPT-J) at the last subject token; "
                             f"model family {family!r} is not supported (use malmen, mend, ft or locft_bf)")
        super().__init__(model, family, device)
        if "{}" not in module or not layers:
            raise ValueError(f"editor {self.name}: module must be a template with {{}} for the layer "
                             f"(got {module!r}) and layers non-empty (got {layers!r})")
        self.tokenizer, self.lam = tokenizer, lam
        self.modules = resolve_modules(model, [module.format(i) for i in sorted(layers)])  # in layer order
        # z lives after the block of the last critical layer: the module path up to its layer index
        self.block = model.get_submodule(module[: module.index("{}") + 2].format(max(layers)))
        self.inject = self.modules[module.format(max(layers))]
        self.target_args = dict(n_steps=n_steps, lr=lr, kl_coef=kl_coef, norm_coef=norm_coef,
                                clamp_factor=clamp_factor, batch_size=batch_size)
        self.batch_size = batch_size
        self.dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        texts = sample_texts(stats_texts, n_samples, stats_source)
        self.covs, self.stats_time_s = key_second_moments(
            model, tokenizer, self.modules, texts, source=stats_source, n_samples=n_samples,
            model_id=model_id or f"random-{model_fingerprint(model)[:16]}", cache_dir=cache_dir,
            max_len=stats_max_len, batch_size=stats_batch_size, device=self.device)
        self.prefixes = make_prefixes(texts, n_prefixes, prefix_words)
        self.solves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # last edit's (K, R, C) per layer

    def layer_delta(self, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """The closed form of one layer: (d_out, d_in)."""
        return memit_delta(keys, resid, cov, self.lam)

    def edit(self, batches: list[dict]) -> Shifts:
        raise NotImplementedError(f"{self.name} needs each edit's subject: call edit_group(group) or edit_records")

    def edit_group(self, group) -> Shifts:
        return self.edit_records(group.records, group.path)

    def edit_records(self, records, path: str = "<records>") -> Shifts:
        """Shifts of the critical layers' weights that insert all `records` at once."""
        reqs = requests(records, path, self.name)
        n, n_pre = len(reqs), len(self.prefixes)
        texts, ends = contexts(reqs, self.prefixes)
        z = target_vectors(self.model, self.tokenizer, reqs, self.prefixes, self.block, self.inject,
                           device=self.device, **self.target_args)  # (n, d)
        shifts, self.solves = {}, {}
        for i, (name, module) in enumerate(self.modules.items()):
            with apply_shifts(self.model, shifts):  # keys and h_L see the earlier layers' updates
                keys, hidden = subject_states(self.model, self.tokenizer, texts, ends, {name: module}, self.block,
                                              self.batch_size * n_pre, self.device)
            k = keys[name].view(n, n_pre, -1).mean(1).T.to(self.dtype)  # (d_in, n), averaged over prefixes
            h = hidden.view(n, n_pre, -1).mean(1).T.to(self.dtype)  # (d, n)
            resid = (z.T.to(self.dtype) - h) / (len(self.modules) - i)  # (d_out, n): this layer's share
            cov = self.covs[name].to(self.dtype)
            delta = self.layer_delta(k, resid, cov)  # (d_out, d_in)
            shifts[f"{name}.weight"] = to_param_layout(module, delta)
            self.solves[name] = (k, resid, cov)
        return shifts

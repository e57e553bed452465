"""MEMIT (Meng et al., ICLR 2023): mass editing of causal LMs at the last subject token, in closed form.

1. Target vectors z_i: the hidden state after the last critical layer L, at the last subject token
   of the bare prompt, that makes the model answer in every context (editor.locate.target_vectors).
2. For each critical layer l, in order, with the updates of the earlier layers applied: keys
   K_l = inputs of the FFN output projection at the last subject token (d_in, n), the mean of the
   bare prompt's key and of the prefixed contexts' mean (editor.locate.template_mean), residual
   R = (z - h_L) / (number of layers left) (d_out, n) with h_L at the bare prompt, and
       Delta_l = R K_l^T (lambda C_l + K_l K_l^T)^{-1},   C_l = E[k k^T] over generic text,
   solved with torch.linalg.solve in float64. Spreading R over the layers keeps each layer's change small.

Ill-posed solves are refused (IllPosedSolve), never run: key statistics from fewer tokens than the
module's input width d_in (C then has rank < d_in), and any system whose condition number kappa
exceeds 1 / eps of the solve's dtype (8.4e6 in float32, 4.5e15 in float64). Past that point the
solve's error bound kappa * eps exceeds 1, so not one digit of the update is reliable; on the tiny
models well-sampled statistics give kappa ~ 1e4-1e6 (docs/bad_input.md, 2).
"""
import logging
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from data.subjects import requests
from editor.base import Editor, Shifts, apply_shifts, frac, maximum, mean, to_param_layout
from editor.locate import context_prefixes, contexts, subject_states, target_vectors, template_mean
from editor.stats import key_second_moments, model_fingerprint, sample_texts
from editor.target_store import TargetStore
from model.load import resolve_modules

log = logging.getLogger(__name__)


Check = Callable[[torch.Tensor, str], None]  # (symmetric system matrix, its name): raises if ill-posed


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float,
                check: Check = lambda a, what: None) -> torch.Tensor:
    """Delta = R K^T (lam C + K K^T)^{-1} (d_out, d_in) for keys K (d_in, n), residuals R (d_out, n), C (d_in, d_in)."""
    a = lam * cov + keys @ keys.T  # (d_in, d_in), symmetric, so Delta a = R K^T  <=>  a Delta^T = K R^T
    check(a, "lambda C + K K^T")
    return torch.linalg.solve(a, keys @ resid.T).T


class IllPosedSolve(ValueError):
    """A closed-form solve of MEMIT or EMMET whose solution would be meaningless."""


def condition_number(a: torch.Tensor, iters: int = 30) -> float:
    """kappa = lambda_max / lambda_min of a symmetric matrix, in float64; inf if not positive definite.

    Power iteration on a and on a^-1 through one Cholesky factor: d^3 / 3 flops (an LU solve takes
    2 d^3 / 3), in float64, plus 30 matrix-vector products; eigvalsh would cost several solves."""
    a = a.double()
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0 or not torch.isfinite(chol).all():
        return math.inf
    start = torch.randn(a.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=a.dtype).to(a.device)
    top, low = start, start
    for _ in range(iters):
        top = a @ top
        top = top / top.norm()
        low = torch.cholesky_solve(low, chol)
        low = low / low.norm()
    lam_max, lam_min = float(top.T @ a @ top), float(low.T @ a @ low)  # Rayleigh quotients
    return lam_max / lam_min if lam_min > 0 else math.inf


class MEMIT(Editor):
    """MEMIT on a causal LM; no meta-training. Keys' statistics are computed (or loaded) at construction."""

    name = "memit"

    def __init__(self, model: nn.Module, family: str, tokenizer, *, layers: list[int], module: str, lam: float,
                 n_steps: int, lr: float, kl_coef: float, norm_coef: float, clamp_factor: float, stop_loss: float,
                 n_prefixes: int, prefix_starts: list[str], prefix_tokens: int, prefix_top_k: int, batch_size: int,
                 stats_texts: list[str], stats_source: str, n_samples: int, stats_max_len: int,
                 stats_batch_size: int, cache_dir: str | Path, model_id: str | None, stats_file: str | None = None,
                 cache_targets: bool = False, device="cpu"):
        if family != "causal":
            raise ValueError(f"editor {self.name} edits causal LMs (GPT-2, GPT-J, Llama) at the last subject token; "
                             f"model family {family!r} is not supported (use malmen, mend, ft or locft_bf)")
        super().__init__(model, family, device)
        if "{}" not in module or not layers:
            raise ValueError(f"editor {self.name}: module must be a template with {{}} for the layer "
                             f"(got {module!r}) and layers non-empty (got {layers!r})")
        self.tokenizer, self.lam = tokenizer, lam
        self.modules = resolve_modules(model, [module.format(i) for i in sorted(layers)],  # in layer order
                                       f"editor.layers={list(layers)} in editor.module={module!r}")
        # z lives after the block of the last critical layer: the module path up to its layer index
        self.block = model.get_submodule(module[: module.index("{}") + 2].format(max(layers)))
        self.inject = self.modules[module.format(max(layers))]
        self.target_args = dict(n_steps=n_steps, lr=lr, kl_coef=kl_coef, norm_coef=norm_coef,
                                clamp_factor=clamp_factor, stop_loss=stop_loss, batch_size=batch_size)
        self.batch_size = batch_size
        self.target_store = None  # set below, once the context prefixes are known
        model_id = model_id or f"random-{model_fingerprint(model)[:16]}"  # built here: named by its weights
        self.prefixes = context_prefixes(model, tokenizer, n_prefixes=n_prefixes, starts=list(prefix_starts),
                                         n_tokens=prefix_tokens, top_k=prefix_top_k, model_id=model_id,
                                         cache_dir=cache_dir, device=self.device)
        if cache_targets:  # z per request, reused by a rerun of the same edit (editor/target_store.py)
            self.target_store = TargetStore(cache_dir, {
                "weights": model_fingerprint(model), "dtype": str(next(model.parameters()).dtype),
                "inject": module.format(max(layers)), "prefixes": self.prefixes,
                "settings": {k: v for k, v in self.target_args.items() if k != "batch_size"}})
        self.dtype = torch.float64  # the closed-form solves, whatever the model's dtype (as MEMIT's authors)
        texts = sample_texts(stats_texts, n_samples, stats_source)
        self.covs, self.stats_tokens, self.stats_time_s = key_second_moments(
            model, tokenizer, self.modules, texts, source=stats_source, n_samples=n_samples, model_id=model_id,
            cache_dir=cache_dir, max_len=stats_max_len, batch_size=stats_batch_size, device=self.device)
        where = f" ({stats_file})" if stats_file else ""
        self.stats_origin = (f"editor.stats_source={stats_source!r}{where}, {len(texts)} of "
                             f"{len(stats_texts)} texts (editor.n_samples={n_samples})")
        more = (f"a larger editor.n_samples (the source has {len(stats_texts)} texts), "
                if len(texts) < len(stats_texts) else "")
        self.more_text = f"{more}a larger data.train_path, or editor.stats_source=wikitext"
        for name, cov in self.covs.items():  # C = mean of n_tokens outer products: rank <= n_tokens
            if self.stats_tokens[name] < cov.shape[0]:
                raise IllPosedSolve(
                    f"editor {self.name}: the key statistics C of module {name} come from {self.stats_tokens[name]} "
                    f"tokens of {self.stats_origin}, fewer than the module's input width d_in = {cov.shape[0]}: "
                    f"C = E[k k^T] has rank at most {self.stats_tokens[name]}, so the closed-form solve is singular "
                    f"or meaningless. Fix: statistics from at least {cov.shape[0]} tokens: {self.more_text}")
        self.solves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # last edit's (K, R, C) per layer
        self.z = torch.zeros(0)  # last edit's target vectors (n, d)
        self.targets: dict[str, torch.Tensor] = {}  # last edit's per request: steps, loss, nll, delta_ratio
        self.fit: dict[str, torch.Tensor] = {}  # last edit's per request: each layer's solve residual, z_gap

    def conditioned(self, name: str, fix: str) -> Check:
        """A check for the systems of module `name`'s solve: IllPosedSolve when kappa > 1 / eps of the
        solve's dtype (see the module docstring), naming the module, the statistics and `fix`."""
        def check(a: torch.Tensor, what: str) -> None:
            kappa, limit = condition_number(a), 1 / torch.finfo(self.dtype).eps
            if kappa > limit:
                raise IllPosedSolve(
                    f"editor {self.name}: the closed-form solve of module {name} is ill-conditioned: {what} has "
                    f"condition number {kappa:.3g}, beyond 1/eps = {limit:.3g} of its {self.dtype} solve, where "
                    f"not one digit of the update is reliable. Its key statistics C come from "
                    f"{self.stats_tokens[name]} tokens of {self.stats_origin}. Fix: {fix}")
        return check

    def layer_delta(self, name: str, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """The closed form of one layer: (d_out, d_in); IllPosedSolve if its system is ill-conditioned."""
        fix = f"more statistics text ({self.more_text}) or a larger editor.lam (now {self.lam:g})"
        return memit_delta(keys, resid, cov, self.lam, self.conditioned(name, fix))

    def diagnostics(self) -> dict:
        """The last edit's target vectors: of n requests, the fraction whose loss reached `stop_loss`
        (`converged`) and whose delta ended at the clamp (`at_clamp`), the mean number of losses
        (`steps`), the answer's mean token NLL at z (nats; mean and max) and |delta| / |h| (mean and
        max): whether the targets themselves were reached, or what held them back (steps, clamp).

        `solve`: where the edited model stands against z, over the `moved` requests (z != h; one whose
        loss met stop_loss before any step asks for no change and is left out). `residual` per layer:
        the solve's relative miss on the keys it was given, |Delta k_i - r_i| / |r_i| (mean; 0: that
        layer took its share r_i exactly). `z_gap`: |z_i - h_i'| / |z_i - h_i|, h the output of layer L
        at the bare prompt before (h) and after (h') the edit (mean and max; 0: the edited model reaches
        z there, 1: it did not move). A small residual with a large z_gap means the loss lies past the
        solves: the bare prompt's keys are not the template means they fitted, and each update also
        moves the states the later layers read."""
        t = self.targets
        if not t:
            return {}
        ratio, clamp = t["delta_ratio"], self.target_args["clamp_factor"]
        moved = self.fit["moved"]
        gap = self.fit["z_gap"][moved]
        solve = {"moved": int(moved.sum()), "residual": {name: mean(self.fit[name][moved]) for name in self.modules},
                 "z_gap_mean": mean(gap), "z_gap_max": maximum(gap)} if moved.any() else {"moved": 0}
        targets = {"n": len(ratio), "converged": frac(t["loss"] < self.target_args["stop_loss"]),
                   "at_clamp": frac(ratio >= clamp * (1 - 1e-4)), "steps": mean(t["steps"]),
                   "nll_mean": mean(t["nll"]), "nll_max": maximum(t["nll"]),
                   "delta_ratio_mean": mean(ratio), "delta_ratio_max": maximum(ratio)}
        if self.target_store is not None:  # this editor's requests so far: read from the store / optimised
            targets["cache"] = {"hits": self.target_store.hits, "computed": self.target_store.computed}
        return {"targets": targets, "solve": solve}

    def edited_modules(self) -> list[str]:
        return list(self.modules)

    def edit(self, batches: list[dict]) -> Shifts:
        raise NotImplementedError(f"{self.name} needs each edit's subject: call edit_group(group) or edit_records")

    def edit_group(self, group) -> Shifts:
        return self.edit_records(group.records, group.path)

    def edit_records(self, records, path: str = "<records>") -> Shifts:
        """Shifts of the critical layers' weights that insert all `records` at once."""
        reqs = requests(records, path, self.name)
        n, n_ctx = len(reqs), len(self.prefixes)
        texts, ends = contexts(reqs, self.prefixes)  # (n * P,) request-major, context 0 the bare prompt
        z, self.targets = target_vectors(self.model, self.tokenizer, reqs, self.prefixes, self.block,
                                         self.inject, device=self.device, store=self.target_store,
                                         **self.target_args)  # (n, d)
        self.z = z
        shifts, self.solves, self.fit = {}, {}, {}
        for i, (name, module) in enumerate(self.modules.items()):
            with apply_shifts(self.model, shifts, self.name):  # keys and h_L see the earlier layers' updates
                keys, hidden = subject_states(self.model, self.tokenizer, texts, ends, {name: module}, self.block,
                                              self.batch_size * n_ctx, self.device)
            k = template_mean(keys[name].view(n, n_ctx, -1)).T.to(self.dtype)  # (d_in, n)
            h = hidden.view(n, n_ctx, -1)[:, 0].T.to(self.dtype)  # (d, n) at the bare prompt, where z is
            if i == 0:
                h_before = h  # (d, n): no layer updated yet
            resid = (z.T.to(self.dtype) - h) / (len(self.modules) - i)  # (d_out, n): this layer's share
            cov = self.covs[name].to(self.dtype)
            delta = self.layer_delta(name, k, resid, cov)  # (d_out, d_in)
            shifts[f"{name}.weight"] = to_param_layout(module, delta)
            self.solves[name] = (k, resid, cov)
            self.fit[name] = (delta @ k - resid).norm(dim=0) / resid.norm(dim=0)  # (n,)
        with apply_shifts(self.model, shifts, self.name):  # h after layer L in the edited model, bare prompts
            _, h_after = subject_states(self.model, self.tokenizer, texts[::n_ctx], ends[::n_ctx], {}, self.block,
                                        self.batch_size, self.device)  # (n, d)
        z64 = z.to(self.dtype)
        need = (z64 - h_before.T).norm(dim=1)  # (n,) |z - h|
        # a request whose z is h (its loss met stop_loss before any step) asks for no change: left out of
        # the ratios, which would be 0 / 0 or float noise over float noise (1e-4 |h| is far above the latter)
        self.fit["moved"] = need > 1e-4 * h_before.norm(dim=0)
        self.fit["z_gap"] = (z64 - h_after.to(self.dtype)).norm(dim=1) / need  # (n,)
        return shifts

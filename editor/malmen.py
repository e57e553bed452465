"""MALMEN: hyper-network value differences aggregated by the normal equation (paper Alg. 1, 2).

Shapes, per edited layer, with n cached tokens (rows, i.e. the paper's U^T and D^T):
  keys K (n, d_in), value gradients (n, d_out), value differences D (n, d_out),
  S* = D^T K (K^T K + lambda I)^{-1}  (d_out, d_in)        [paper: D U^T (U U^T + lambda I)^{-1}]
Meta-training (Alg. 2): stage 1 computes G = dL_meta/dW~ on the LM alone; stage 2 pulls G back:
  M = G (K^T K + lambda I)^{-1},  dL/dD = K M^T,  dL/dlambda = -<M, S*>   (Theorems 1, 2)
and back-propagates the proxy loss <dL/dD, D(theta)> through the hyper-network in batches.
The solve of each layer (editor/normal_equation.py) is built and factored once per step, in whichever
of two exact forms is smaller: K^T K + lambda I (d_in, d_in) or K K^T + lambda I (n, n).
`meta_grad_end_to_end` is the MEND-style procedure (Fig. 1): one backward through both networks.
"""
import torch
from torch import nn
from tqdm import tqdm

from editor.base import Editor, Shifts, from_param_layout, shifted, to_param_layout
from editor.hypernet import INPUT_VERSION, HyperNet
from editor.normal_equation import NormalEquation, SolveError  # noqa: F401  (SolveError: part of this API)
from model.lm import answer_tokens, kl, logits, nll, to_device
from model.trace import trace, weight_shape


# How the meta losses L_gen and L_loc reduce over a group (editor.loss_reduction):
#   token_mean  mean over all answer tokens of the group: the batch-size-free form of the authors' runs
#               (each LM batch's token mean, added; clipping removes the common scale)
#   sum         the paper's written formulas: sums over answer tokens, divided by m
# The edit loss, whose value gradients are the hyper-network's input, is neither: it is summed over the
# answer tokens, so that one edit's inputs do not depend on m or its group (model/trace.py).
REDUCTIONS = ("token_mean", "sum")


class MALMEN(Editor):
    """Massive language model editing network."""

    name = "malmen"
    trainable = True

    def __init__(self, model: nn.Module, family: str, modules: dict[str, nn.Module], *,
                 rank: int, n_blocks: int, lr_init: float, lambda_init: float, meta_lr: float,
                 loc_coef: float, max_grad_norm: float, token: str, batch_size: int,
                 loss_reduction: str = "token_mean", regularize: bool = True, device="cpu", cache_device="cpu",
                 dtype: torch.dtype = torch.float32, eta_param: str = "plain", scale_lr: float | None = None,
                 eta_search: bool = False, lambda_rel: float | None = None):
        super().__init__(model, family, device)
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"editor.loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
        self.modules, self.token, self.batch_size = modules, token, batch_size
        self.loss_reduction = loss_reduction
        self.loc_coef, self.max_grad_norm, self.regularize = loc_coef, max_grad_norm, regularize
        self.cache_device, self.dtype = torch.device(cache_device), dtype
        # One hyper-network per distinct weight shape; `slots` maps a module to (network, layer index).
        by_shape: dict[str, list[str]] = {}
        for name, module in modules.items():
            d_out, d_in = weight_shape(module)
            by_shape.setdefault(f"{d_out}x{d_in}", []).append(name)
        self.slots = {n: (key, i) for key, names in by_shape.items() for i, n in enumerate(names)}
        self.net = nn.ModuleDict({
            key: HyperNet(d_in=weight_shape(modules[names[0]])[1], d_out=weight_shape(modules[names[0]])[0],
                          n_layers=len(names), rank=rank, n_blocks=n_blocks, lr_init=lr_init,
                          lambda_init=lambda_init, eta_param=eta_param)
            for key, names in by_shape.items()}).to(self.device, dtype)
        if not regularize:  # ablation "no regularisation": lambda = 0, not learned
            for net in self.net.values():
                net.log_lambda.requires_grad_(False)
        # At the model's scale (docs/experiments.md): eta and lambda in their own Adam group (scale_lr), eta found
        # by a search on the first meta-training group (eta_search), lambda from its keys (lambda_rel); None /
        # False: the paper's single group at meta_lr and fixed initial values
        self.eta_search, self.lambda_rel, self.calibrated = eta_search, lambda_rel, None
        scales = {id(p) for net in self.net.values() for p in net.scale_parameters()} if scale_lr is not None else set()
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad and id(p) not in scales]}]
        if scales:
            groups.append({"params": [p for p in self.net.parameters() if p.requires_grad and id(p) in scales],
                           "lr": scale_lr})
        self.opt = torch.optim.Adam(groups, lr=meta_lr)
        self.step = 0
        self.trained: dict | None = None  # {m, token, loss_reduction} of the meta-training; None untrained

    # ----- pieces shared by inference and training -----------------------------------------
    def _net(self, name: str) -> tuple[HyperNet, int]:
        key, layer = self.slots[name]
        return self.net[key], layer

    def _lambda(self, net: HyperNet, layer: int) -> torch.Tensor:
        return net.log_lambda[layer].exp() if self.regularize else net.log_lambda.new_zeros(())

    def _chunks(self, n: int):
        return (slice(i, i + self.batch_size) for i in range(0, n, self.batch_size))

    def cache(self, batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and value gradients of the edit tuples, per module."""
        return trace(self.model, self.modules, batches, self.family, self.token, self.device,
                     self.cache_device, self.dtype, self.prefix)

    def _denominator(self, group, batches: list[dict]) -> int:
        """What the summed per-example losses of `batches` are divided by (editor.loss_reduction)."""
        return answer_tokens(batches, self.family) if self.loss_reduction == "token_mean" else len(group.records)

    def update_norms(self, cache: dict) -> None:
        """Fold this meta-training step's cached tuples into the running input statistics of each
        layer's network (shared by the layers of one shape); constants afterwards."""
        for name, (keys, grads) in cache.items():
            net, _ = self._net(name)
            net.norm.update(torch.cat([keys, grads], -1).to(self.device))

    def system(self, name: str, keys: torch.Tensor, form: str | None = None) -> NormalEquation:
        """The normal equation of one layer, built and factored once per step and shared by `aggregate`
        and `pull_back` (editor/normal_equation.py: primal or dual form, Cholesky or LU)."""
        net, layer = self._net(name)
        return NormalEquation(name, keys, self._lambda(net, layer), self.regularize, self.batch_size, form)

    def value_diffs(self, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """D (n, d_out): the hyper-network's value differences of all cached tokens, in batches."""
        net, layer = self._net(name)
        return torch.cat([net.value_diffs(keys[s].to(self.device), grads[s].to(self.device), layer)
                          for s in self._chunks(keys.shape[0])])

    def aggregate(self, name: str, keys: torch.Tensor, grads: torch.Tensor, system=None) -> torch.Tensor:
        """S* (d_out, d_in) by the normal equation; differentiable when grad is enabled. `system`: the
        layer's `system(name, keys)` when the caller already built it."""
        system = self.system(name, keys) if system is None else system
        return system.shift(self.value_diffs(name, keys, grads))

    def pull_back(self, name: str, keys: torch.Tensor, grads: torch.Tensor, grad_w: torch.Tensor,
                  shift: torch.Tensor, system=None) -> None:
        """Stage 2: accumulate dL_meta/dtheta from G = dL_meta/dW~ (d_out, d_in) for one layer; `system`
        is the factored normal equation that `aggregate` solved (built again if None)."""
        net, layer = self._net(name)
        if system is None:
            with torch.no_grad():
                system = self.system(name, keys)
                system.shift(self.value_diffs(name, keys, grads))
        grad_d, inner = system.pull_back(grad_w, shift)  # dL/dD (n, d_out) = K M^T, <M, S*>
        if self.regularize:  # dL/dlambda = -<M, S*>, chained through lambda = exp(log_lambda)
            (-inner * self._lambda(net, layer)).backward()
        for s in self._chunks(keys.shape[0]):
            k, g = keys[s].to(self.device), grads[s].to(self.device)
            (grad_d[s] * net.value_diffs(k, g, layer)).sum().backward()

    # ----- the editor contract ---------------------------------------------------------------
    def edited_modules(self) -> list[str]:
        return list(self.modules)

    def shifts(self, cache: dict, systems: dict | None = None) -> dict[str, torch.Tensor]:
        """S* per module, (d_out, d_in); `systems`: the factored normal equations per module, if built."""
        return {n: self.aggregate(n, *cache[n], system=(systems or {}).get(n)) for n in self.modules}

    def edit(self, batches: list[dict]) -> Shifts:
        """Shifts for the edit tuples of `batches`; `diagnostics()` then holds their residual (Fig. 8)."""
        cache = self.cache(batches)
        with torch.no_grad():
            shifts = self.shifts(cache)
            self._residual = self.residual(cache, shifts)
        return {f"{n}.weight": to_param_layout(self.modules[n], s) for n, s in shifts.items()}

    def diagnostics(self) -> dict:
        """The last edit's mean residual ||S* u - d|| / ||d|| (paper Fig. 8); {} before any edit."""
        return {"residual": self._residual} if getattr(self, "_residual", None) is not None else {}

    @torch.no_grad()
    def residual(self, cache: dict, shifts: dict[str, torch.Tensor]) -> float:
        """Mean over layers and cached tokens of ||S* u_j - d_j|| / ||d_j|| (paper 5.2, Fig. 8).

        d_j is the hyper-network's value difference for token j, i.e. what its own rank-one shift does
        to u_j; the residual measures how much aggregating the m edits into one S* cancels them."""
        per_layer = []
        for name, shift in shifts.items():  # shift (d_out, d_in)
            net, layer = self._net(name)
            keys, grads = cache[name]
            total = 0
            for s in self._chunks(keys.shape[0]):
                k, g = keys[s].to(self.device), grads[s].to(self.device)
                d = net.value_diffs(k, g, layer)  # (b, d_out)
                total = total + ((k @ shift.T - d).norm(dim=-1) / d.norm(dim=-1)).sum()  # (b,) summed
            per_layer.append(total / keys.shape[0])
        return float(sum(per_layer) / len(per_layer))  # one read per call

    def meta_losses(self, group, params: dict, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """L_gen and L_loc of the edited LM (`params`) over the equivalent and unrelated tuples.

        Per-example losses are summed over LM batches and divided by a total of the whole group
        (answer tokens or m, `loss_reduction`), so any data.batch_size gives the same value. With
        backward=True each batch is back-propagated at once (stage 1)."""
        n_gen, n_loc = self._denominator(group, group.equiv), self._denominator(group, group.unrel)
        total_gen, total_loc = 0.0, 0.0
        for b in group.equiv:
            b = to_device(b, self.device)
            loss = nll(logits(self.model, b, self.family, params, self.prefix), b, self.family).sum() / n_gen
            if backward:
                loss.backward()
                loss = loss.detach()
            total_gen = total_gen + loss
        for b in group.unrel:
            b = to_device(b, self.device)
            with torch.no_grad():
                ref = logits(self.model, b, self.family, prefix=self.prefix)  # the pre-edit model p_W
            loss = kl(ref, logits(self.model, b, self.family, params, self.prefix), b, self.family).sum() / n_loc
            if backward:
                (self.loc_coef * loss).backward()
                loss = loss.detach()
            total_loc = total_loc + loss
        return total_gen, total_loc

    def meta_grad(self, group) -> dict[str, float]:
        """Accumulate dL_meta/dtheta in .grad by the two-stage procedure (Alg. 2)."""
        group = group.to(self.device)  # the LM batches, moved once for the trace and both meta losses
        cache = self.cache(group.edit)
        self.update_norms(cache)
        with torch.no_grad():  # each layer's K^T K + lambda I, built and factored once for S* and stage 2
            systems = {n: self.system(n, cache[n][0]) for n in self.modules}
            shifts = self.shifts(cache, systems)
        # Stage 1: the LM alone, with W~ as fresh leaves, accumulates G = dL_meta/dW~.
        leaves = {n: shifted(mod.weight, to_param_layout(mod, shifts[n]), f"{n}.weight", self.label).detach()
                  .requires_grad_()
                  for n, mod in self.modules.items()}
        gen, loc = self.meta_losses(group, {f"{n}.weight": w for n, w in leaves.items()}, backward=True)
        # Stage 2: the hyper-network alone, on the cached tuples in batches.
        for n, mod in self.modules.items():
            grad_w = from_param_layout(mod, leaves[n].grad).to(self.device, self.dtype)  # from the module's device
            self.pull_back(n, *cache[n], grad_w, shifts[n], systems[n])
        return {"gen_loss": float(gen.detach()), "loc_loss": float(loc.detach())}

    def meta_grad_end_to_end(self, group) -> dict[str, float]:
        """The same gradient by one backward through hyper-network and LM (Fig. 1, MEND-style)."""
        group = group.to(self.device)
        cache = self.cache(group.edit)
        self.update_norms(cache)
        shifts = self.shifts(cache)
        params = {f"{n}.weight": shifted(mod.weight, to_param_layout(mod, shifts[n]), f"{n}.weight", self.label)
                  for n, mod in self.modules.items()}
        gen, loc = self.meta_losses(group, params, backward=False)
        (gen + self.loc_coef * loc).backward()
        return {"gen_loss": float(gen.detach()), "loc_loss": float(loc.detach())}

    def calibrate(self, group, grid: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-16, 1))) -> dict:
        """Before the first meta-step (editor.lambda_rel, editor.eta_search), on the first meta-training group:
        lambda of each layer = lambda_rel * the mean squared norm of its cached keys; then one eta for every layer,
        the one of `grid` with the least meta loss L_gen + loc_coef * L_loc of the group edited at it. S* is
        linear in eta (D is, and the solve is linear in D), so S* is computed once at eta = 1 and scaled. The
        input statistics are those the first meta-step will see, and are put back afterwards."""
        group = group.to(self.device)
        cache, out = self.cache(group.edit), {}  # the trace needs gradients; nothing after it does
        with torch.no_grad():
            self._calibrate(group, cache, grid, out)
        self.calibrated = out
        return out

    def _calibrate(self, group, cache: dict, grid: tuple[float, ...], out: dict) -> None:
        if self.lambda_rel is not None and self.regularize:
            for n in self.modules:
                net, layer = self._net(n)
                net.log_lambda[layer] = (self.lambda_rel * cache[n][0].pow(2).sum(-1).mean()).log()
            out["lambda"] = {n: float(self._lambda(*self._net(n))) for n in self.modules}
        if self.eta_search:
            saved = {k: net.norm.state_dict() for k, net in self.net.items()}
            saved = {k: {b: v.clone() for b, v in state.items()} for k, state in saved.items()}
            self.update_norms(cache)
            for n in self.modules:
                self._net(n)[0].set_eta(self._net(n)[1], 1.0)
            unit = self.shifts(cache)  # S* at eta = 1, per module
            losses = []
            for eta in tqdm(grid, desc="eta search", leave=False, dynamic_ncols=True):
                params = {f"{n}.weight": shifted(mod.weight, to_param_layout(mod, eta * unit[n]), f"{n}.weight",
                                                 self.label) for n, mod in self.modules.items()}
                gen, loc = self.meta_losses(group, params, backward=False)
                losses.append(float(gen + self.loc_coef * loc))
            best = grid[min(range(len(grid)), key=lambda i: losses[i])]
            for n in self.modules:
                self._net(n)[0].set_eta(self._net(n)[1], best)
            for k, net in self.net.items():
                net.norm.load_state_dict(saved[k])
            out.update(eta=best, eta_grid=list(grid), meta_loss=losses)

    @torch.no_grad()
    def scales(self) -> dict[str, list[float]]:
        """eta and lambda of each edited module, in module order (results.json's train log records them per step)."""
        return {"eta": [float(self._net(n)[0].eta()[self._net(n)[1]]) for n in self.modules],
                "lambda": [float(self._lambda(*self._net(n))) for n in self.modules]}

    def meta_step(self, group, end_to_end: bool = False) -> dict[str, float]:
        """One Adam step on the meta loss of an EditGroup, gradient clipped to max_grad_norm."""
        if self.step == 0 and self.calibrated is None and (self.eta_search or self.lambda_rel is not None):
            self.calibrate(group)
        self.opt.zero_grad(set_to_none=True)
        metrics = (self.meta_grad_end_to_end if end_to_end else self.meta_grad)(group)
        params = [p for p in self.net.parameters() if p.requires_grad]
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.opt.step()
        self.step += 1
        metrics.update(self.scales())  # after the step: the values the next edit uses
        self.trained = {"m": len(group.records), "token": self.token, "loss_reduction": self.loss_reduction}
        return metrics

    def state_dict(self) -> dict:
        """The checkpoint's editor part; `input_version` says what inputs the network was trained on."""
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "trained": self.trained, "input_version": INPUT_VERSION, "calibrated": self.calibrated}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.trained = state["step"], state.get("trained")
        self.calibrated = state.get("calibrated")

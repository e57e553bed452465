"""MALMEN: hyper-network value differences aggregated by the normal equation (paper Alg. 1, 2), and MEND.

`edit` is Alg. 1 and `meta_grad` Alg. 2, each one function in the paper's steps and names. Per edited layer,
with n cached tokens as rows (the paper's U^T and D^T):
  keys U (n, d_in), value gradients dL/dV (n, d_out), value differences D (n, d_out),
  S* = D^T U (U^T U + lambda I)^{-1}  (d_out, d_in)        [paper: D U^T (U U^T + lambda I)^{-1}]
Meta-training: stage 1 computes G = dL_meta/dW~ on the LM alone; stage 2 pulls G back (Theorems 1, 2) and
back-propagates a proxy loss through the hyper-network in batches. How the per-token shifts become S*, and how
stage 2 pulls back through it, is the layer's aggregation (editor/aggregation.py): the normal equation
(MALMEN) or the sum of the shifts (MEND, editor/mend.py, and the ablation "sum of parameter shifts").
`meta_grad_end_to_end` is the MEND-style procedure (Fig. 1): one backward through both networks.
"""
import torch
from torch import nn
from tqdm import tqdm

from editor.aggregation import AGGREGATIONS
from editor.base import Editor, Shifts, from_param_layout, shifted, to_param_layout
from editor.hypernet import INPUT_VERSION, HyperNet
from editor.normal_equation import SolveError  # noqa: F401  (SolveError: part of this API)
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
                 eta_search: bool = False, lambda_rel: float | None = None, aggregation: str = "normal_equation"):
        super().__init__(model, family, device)
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"editor.loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"editor.aggregation must be one of {tuple(AGGREGATIONS)}, got {aggregation!r}")
        self.aggregation = AGGREGATIONS[aggregation]
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

    # ----- pieces of Alg. 1 and 2 ----------------------------------------------------------------------
    def network(self, name: str) -> tuple[HyperNet, int]:
        """The hyper-network of a module's weight shape, and the module's layer index in it."""
        key, layer = self.slots[name]
        return self.net[key], layer

    def regularizer(self, name: str) -> torch.Tensor:
        """lambda of a module (0 in the no-regularisation ablation)."""
        net, layer = self.network(name)
        return net.log_lambda[layer].exp() if self.regularize else net.log_lambda.new_zeros(())

    def batches(self, keys: torch.Tensor, grads: torch.Tensor):
        """(rows, keys, value gradients) of the cached tokens, batch_size at a time, on the editor's device."""
        for i in range(0, keys.shape[0], self.batch_size):
            s = slice(i, i + self.batch_size)
            yield s, keys[s].to(self.device), grads[s].to(self.device)

    def cache(self, batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (U (n, d_in), dL/dV (n, d_out))}: keys and value gradients of the edit loss L (model/trace.py)."""
        with self.phase("trace"):
            return trace(self.model, self.modules, batches, self.family, self.token, self.device,
                         self.cache_device, self.dtype, self.prefix)

    def _denominator(self, group, batches: list[dict]) -> int:
        """What the summed per-example losses of `batches` are divided by (editor.loss_reduction)."""
        return answer_tokens(batches, self.family) if self.loss_reduction == "token_mean" else len(group.records)

    def layers(self, cache: dict, form: str | None = None) -> dict:
        """Each module's aggregation of its cached tokens (editor/aggregation.py): built once, for S* and stage 2."""
        return {n: self.aggregation(self, n, *cache[n], form=form) for n in self.modules if n in cache}

    def shifts(self, cache: dict) -> dict[str, torch.Tensor]:
        """S* (d_out, d_in) per module; differentiable when grad is enabled."""
        return {n: layer.shift() for n, layer in self.layers(cache).items()}

    def update_norms(self, cache: dict) -> None:
        """Fold this meta-training step's cached tuples into the running input statistics of each
        layer's network (shared by the layers of one shape); constants afterwards."""
        for name, (keys, grads) in cache.items():
            self.network(name)[0].norm.update(torch.cat([keys, grads], -1).to(self.device))

    def edited_modules(self) -> list[str]:
        return list(self.modules)

    # ----- Alg. 1: editor inference ------------------------------------------------------------------
    def edit(self, batches: list[dict]) -> Shifts:
        """The shift S*_l of every edited layer l for the edit tuples (x_i, y_i) of `batches`; `diagnostics()`
        then holds their residual (Fig. 8)."""
        # L = -sum_i log p_W(y_i | x_i); cache the keys u_l,j; back-propagate L; cache dL/dv_l,j
        cache = self.cache(batches)  # {l: (U_l (n, d_in), dL/dV_l (n, d_out))}
        with torch.no_grad():
            layers = self.layers(cache)  # MALMEN: U_l^T U_l + lambda_l I of each layer, factored
            # S_l,j = g_theta(u_l,j, dL/dv_l,j); d_l,j = S_l,j u_l,j; S*_l = D_l^T U_l (U_l^T U_l + lambda_l I)^-1
            # (MEND: S*_l = sum_j S_l,j)
            shifts = {n: layer.shift() for n, layer in layers.items()}
            self._residual = residual(layers, shifts)
        # W~_l = W_l + S*_l: applied by the caller (editor/base.apply_shifts), in the weight's own layout
        return {f"{n}.weight": to_param_layout(self.modules[n], s) for n, s in shifts.items()}

    def diagnostics(self) -> dict:
        """The last edit's mean residual ||S* u - d|| / ||d|| (paper Fig. 8); {} before any edit."""
        return {"residual": self._residual} if getattr(self, "_residual", None) is not None else {}

    # ----- Alg. 2: editor training -------------------------------------------------------------------
    def meta_grad(self, group) -> dict[str, float]:
        """Accumulate dL_meta/dtheta (and dL_meta/dlambda) in .grad by the two stages, for one EditGroup."""
        group = group.to(self.device)  # the LM batches, moved once for the trace and both meta losses
        cache = self.cache(group.edit)  # W~ = editor inference (Alg. 1): cache (u_l,j, dL/dv_l,j) ...
        self.update_norms(cache)
        with torch.no_grad():
            layers = self.layers(cache)
            shifts = {n: layer.shift() for n, layer in layers.items()}  # ... and S*_l
        # Stage 1, the LM alone: L_meta (eq. 1) of the equivalent and unrelated tuples at W~ (fresh leaves),
        # back-propagated in batches; cache G_l = dL_meta/dW~_l
        leaves = {n: shifted(mod.weight, to_param_layout(mod, shifts[n]), f"{n}.weight", self.label).detach()
                  .requires_grad_()
                  for n, mod in self.modules.items()}
        with self.phase("stage 1"):
            gen, loc = self.meta_losses(group, {f"{n}.weight": w for n, w in leaves.items()}, backward=True)
        # Stage 2, the hyper-network alone: M_l = G_l (U_l^T U_l + lambda_l I)^-1; dL/dD_l = U_l M_l^T;
        # dL/dlambda_l = -<M_l, S*_l>; back-propagate L~ = sum_l <dL/dD_l, D_l(theta)> in batches
        with self.phase("stage 2"):
            for n, mod in self.modules.items():
                grad_w = from_param_layout(mod, leaves[n].grad).to(self.device, self.dtype)  # (d_out, d_in)
                layers[n].pull_back(grad_w, shifts[n])
        return {"gen_loss": float(gen.detach()), "loc_loss": float(loc.detach())}

    def meta_losses(self, group, params: dict, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """L_gen and L_loc of the edited LM (`params`) over the equivalent and unrelated tuples.

        Per-example losses are summed over LM batches and divided by a total of the whole group
        (answer tokens or m, `loss_reduction`), so any data.batch_size gives the same value. With
        backward=True each batch is back-propagated at once (stage 1)."""
        n_gen, n_loc = self._denominator(group, group.equiv), self._denominator(group, group.unrel)
        total_gen, total_loc = 0.0, 0.0
        for b in group.equiv:
            b = to_device(b, self.device)
            with self.phase("edited forward"):
                out = logits(self.model, b, self.family, params, self.prefix)
            loss = nll(out, b, self.family).sum() / n_gen
            if backward:
                loss.backward()
                loss = loss.detach()
            total_gen = total_gen + loss
        for b in group.unrel:
            b = to_device(b, self.device)
            with torch.no_grad(), self.phase("KL reference"):
                ref = logits(self.model, b, self.family, prefix=self.prefix)  # the pre-edit model p_W
            with self.phase("edited forward"):
                out = logits(self.model, b, self.family, params, self.prefix)
            loss = kl(ref, out, b, self.family).sum() / n_loc
            if backward:
                (self.loc_coef * loss).backward()
                loss = loss.detach()
            total_loc = total_loc + loss
        return total_gen, total_loc

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
                net, layer = self.network(n)
                net.log_lambda[layer] = (self.lambda_rel * cache[n][0].pow(2).sum(-1).mean()).log()
            out["lambda"] = {n: float(self.regularizer(n)) for n in self.modules}
        if self.eta_search:
            saved = {k: net.norm.state_dict() for k, net in self.net.items()}
            saved = {k: {b: v.clone() for b, v in state.items()} for k, state in saved.items()}
            self.update_norms(cache)
            for n in self.modules:
                self.network(n)[0].set_eta(self.network(n)[1], 1.0)
            unit = self.shifts(cache)  # S* at eta = 1, per module
            losses = []
            for eta in tqdm(grid, desc="eta search", leave=False, dynamic_ncols=True):
                params = {f"{n}.weight": shifted(mod.weight, to_param_layout(mod, eta * unit[n]), f"{n}.weight",
                                                 self.label) for n, mod in self.modules.items()}
                gen, loc = self.meta_losses(group, params, backward=False)
                losses.append(float(gen + self.loc_coef * loc))
            best = grid[min(range(len(grid)), key=lambda i: losses[i])]
            for n in self.modules:
                self.network(n)[0].set_eta(self.network(n)[1], best)
            for k, net in self.net.items():
                net.norm.load_state_dict(saved[k])
            out.update(eta=best, eta_grid=list(grid), meta_loss=losses)

    @torch.no_grad()
    def scales(self) -> dict[str, list[float]]:
        """eta and lambda of each edited module, in module order (results.json's train log records them per step)."""
        return {"eta": [float(self.network(n)[0].eta()[self.network(n)[1]]) for n in self.modules],
                "lambda": [float(self.regularizer(n)) for n in self.modules]}

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


@torch.no_grad()
def residual(layers: dict, shifts: dict[str, torch.Tensor]) -> float:
    """Mean over layers and cached tokens of ||S* u_j - d_j|| / ||d_j|| (paper 5.2, Fig. 8).

    d_j is the hyper-network's value difference for token j, i.e. what its own rank-one shift does to u_j;
    the residual measures how much aggregating the m edits into one S* cancels them."""
    per_layer = []
    for name, shift in shifts.items():  # shift (d_out, d_in)
        layer = layers[name]
        total = 0
        for _, k, g in layer.editor.batches(layer.keys, layer.grads):
            d = layer.net.value_diffs(k, g, layer.layer)  # (b, d_out)
            total = total + ((k @ shift.T - d).norm(dim=-1) / d.norm(dim=-1)).sum()  # (b,) summed
        per_layer.append(total / layer.keys.shape[0])
    return float(sum(per_layer) / len(per_layer))  # one read per call

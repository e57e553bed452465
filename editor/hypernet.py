"""The hyper-network g_theta with MEND's architecture (Mitchell et al. 2022; paper A.1).

One network per distinct weight shape (d_out, d_in), shared by every edited layer of that shape.
Input z = concat(u, dL/dv) (d_in + d_out), normalised with running statistics shared by those layers;
then `n_blocks` residual blocks h <- h + s_l * max(0, h A B + c) + t_l, each modulated by a per-layer
scale s_l and offset t_l; the output splits back into a pseudo key u~ (d_in) and a pseudo value
gradient g~ (d_out). Per layer it also holds the learning rate eta (a plain parameter, as the paper's, or
exp(log_lr) > 0 with editor.eta_param=log) and, for MALMEN, the regulariser lambda = exp(log_lambda) > 0. The block, its initialisation and the shared normaliser are those of
the runs behind the paper's numbers (methods.md, "Where the paper is silent").
"""
import math

import torch
from torch import nn


# What a checkpoint's hyper-network was trained on (pipeline/checkpoint.py refuses any other):
#   1  value gradients of an edit loss averaged over the whole group (they shrank as 1/m), and a normaliser
#      std of sqrt(var + 1e-8), whose floor of 1e-4 left value-gradient channels of scale 1e-6 unnormalised
#   2  the summed edit loss (model/trace.py) and the standardising normaliser below (docs/implementation_notes.md)
INPUT_VERSION = 2
ETA_PARAMS = ("plain", "log")  # editor.eta_param: eta as it is (the paper's), or exp of a parameter (eta > 0)
EPS = torch.finfo(torch.float32).eps  # 1.19e-7, added to the standard deviation (the authors' placement)
# Tensors renamed after checkpoints were written, old name -> new: t_l, each block's per-layer offset, was `shift`,
# the word this project keeps for S* and the parameter shifts. Checkpoints with the old names load unchanged.
RENAMED = {"shift": "offset"}


def rename_old_tensors(state: dict, prefix: str = "") -> None:
    """In place: the tensors of the HyperNet at `prefix` in `state` that hold an old name (RENAMED) take the new one."""
    for old, new in RENAMED.items():
        if prefix + old in state and prefix + new not in state:
            state[prefix + new] = state.pop(prefix + old)


class RunningNorm(nn.Module):
    """Feature-wise running mean and standard deviation (n - 1 denominator; Chan et al. merge),
    applied as constants: (x - mean) / (std + EPS). Every channel comes out standardised whatever its
    scale: value gradients of scale 1e-6 as well as keys of scale 1 (a floor under std would leave the
    small ones unnormalised). MALMEN.update_norms folds in meta-training batches only: validation and
    mode=edit never change the editor (the authors' runs also folded validation batches in)."""

    def __init__(self, dim: int, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the statistics of x (n, dim)."""
        n = x.shape[0]
        mean, var = x.mean(0), x.var(0, unbiased=False)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += var * n + delta.pow(2) * self.count * n / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, dim) standardised per channel; the identity before two samples were seen."""
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).clamp(min=0).sqrt()  # (dim,)
        return (x - self.mean) / (std + self.eps)


class HyperNet(nn.Module):
    """MEND-architecture hyper-network for one weight shape and `n_layers` layers sharing it."""

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int,
                 lr_init: float, lambda_init: float, eta_param: str = "plain"):
        super().__init__()
        if eta_param not in ETA_PARAMS:
            raise ValueError(f"editor.eta_param must be one of {ETA_PARAMS}, got {eta_param!r}")
        self.d_in, d = d_in, d_in + d_out
        self.norm = RunningNorm(d)  # one per network: every layer of this shape feeds it (as MEND)
        # Block k: h + s * max(0, h A B + c) + t. A ~ N(0, 1) unscaled, B = 0 and c = 0, so every block
        # starts as the identity. The non-linearity follows the whole low-rank product; clamp(min=0)
        # passes the gradient at exactly 0 (relu would not), so B learns from the first step.
        self.A = nn.Parameter(torch.randn(n_blocks, d, rank))
        self.B = nn.Parameter(torch.zeros(n_blocks, rank, d))
        self.c = nn.Parameter(torch.zeros(n_blocks, d))
        self.scale = nn.Parameter(torch.ones(n_layers, n_blocks, d))
        self.offset = nn.Parameter(torch.zeros(n_layers, n_blocks, d))
        if eta_param == "plain":  # the paper's: eta itself, which Adam can move through zero
            self.lr = nn.Parameter(torch.full((n_layers,), float(lr_init)))
        else:  # eta = exp(log_lr) > 0: Adam moves it by a factor, whatever its scale
            self.log_lr = nn.Parameter(torch.full((n_layers,), math.log(lr_init)))
        self.log_lambda = nn.Parameter(torch.full((n_layers,), math.log(lambda_init)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        rename_old_tensors(state_dict, prefix)  # a checkpoint written before RENAMED
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def eta(self) -> torch.Tensor:
        """The per-layer learning rates eta (n_layers,)."""
        return self.lr if hasattr(self, "lr") else self.log_lr.exp()

    def scale_parameters(self) -> list[nn.Parameter]:
        """eta's and lambda's parameters (editor.scale_lr gives them their own Adam learning rate)."""
        return [self.lr if hasattr(self, "lr") else self.log_lr, self.log_lambda]

    @torch.no_grad()
    def set_eta(self, layer: int, value: float) -> None:
        """Set eta of one layer (editor.eta_search)."""
        if hasattr(self, "lr"):
            self.lr[layer] = value
        else:
            self.log_lr[layer] = math.log(value)

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, layer: int):
        """keys (n, d_in), grads (n, d_out) -> pseudo keys (n, d_in), pseudo grads (n, d_out)."""
        h = self.norm(torch.cat([keys, grads], -1))  # (n, d_in + d_out)
        # unbind, not A[k]: the backward of one unbind writes each gradient once, where every A[k] would fill a
        # zero tensor of A's whole size (2 x 2112 x 1920 on SmolLM2) per block and call (stage 2: a third faster)
        blocks = zip(self.A.unbind(0), self.B.unbind(0), self.c.unbind(0), self.scale[layer].unbind(0),
                     self.offset[layer].unbind(0))
        for a, b, c, scale, offset in blocks:
            h = h + scale * torch.clamp(h @ a @ b + c, min=0) + offset
        return h[:, :self.d_in], h[:, self.d_in:]

    def value_diffs(self, keys: torch.Tensor, grads: torch.Tensor, layer: int) -> torch.Tensor:
        """d_j = -eta (u~_j . u_j) g~_j (paper A.2): (n, d_out)."""
        pk, pg = self(keys, grads, layer)
        return -self.eta()[layer] * (pk * keys).sum(-1, keepdim=True) * pg

"""The hyper-network g_theta with MEND's architecture (Mitchell et al. 2022; paper A.1).

One network per distinct weight shape (d_out, d_in), shared by every edited layer of that shape.
Input z = concat(u, dL/dv) (d_in + d_out), normalised per layer with running statistics; then
`n_blocks` residual low-rank MLP blocks, each modulated by a per-layer scale and shift; the output
splits back into a pseudo key u~ (d_in) and a pseudo value gradient g~ (d_out). Per layer it also
holds the learning rate eta and, for MALMEN, the regulariser lambda = exp(log_lambda) > 0.
"""
import math

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Feature-wise running mean/variance (Chan et al. merge), applied as constants."""

    def __init__(self, dim: int, eps: float = 1e-8):
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
        if self.count < 2:  # no statistics yet: identity
            return x
        std = (self.m2 / (self.count - 1)).clamp(min=0).add(self.eps).sqrt()
        return (x - self.mean) / std


class HyperNet(nn.Module):
    """MEND-architecture hyper-network for one weight shape and `n_layers` layers sharing it."""

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int,
                 lr_init: float, lambda_init: float):
        super().__init__()
        self.d_in, d = d_in, d_in + d_out
        self.norms = nn.ModuleList(RunningNorm(d) for _ in range(n_layers))
        # Block k: h + scale * (relu(h A + a) B + b) + shift. B starts at zero so every block starts
        # as the identity; the relu sits between the factors so that B still gets a gradient.
        self.down = nn.ModuleList(nn.Linear(d, rank) for _ in range(n_blocks))
        self.up = nn.ModuleList(nn.Linear(rank, d) for _ in range(n_blocks))
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        for down in self.down:
            nn.init.zeros_(down.bias)
        self.scale = nn.Parameter(torch.ones(n_layers, n_blocks, d))
        self.shift = nn.Parameter(torch.zeros(n_layers, n_blocks, d))
        self.lr = nn.Parameter(torch.full((n_layers,), float(lr_init)))
        self.log_lambda = nn.Parameter(torch.full((n_layers,), math.log(lambda_init)))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, layer: int):
        """keys (n, d_in), grads (n, d_out) -> pseudo keys (n, d_in), pseudo grads (n, d_out)."""
        h = self.norms[layer](torch.cat([keys, grads], -1))  # (n, d_in + d_out)
        for k, (down, up) in enumerate(zip(self.down, self.up)):
            h = h + self.scale[layer, k] * up(torch.relu(down(h))) + self.shift[layer, k]
        return h[:, :self.d_in], h[:, self.d_in:]

    def value_diffs(self, keys: torch.Tensor, grads: torch.Tensor, layer: int) -> torch.Tensor:
        """d_j = -eta (u~_j . u_j) g~_j (paper A.2): (n, d_out)."""
        pk, pg = self(keys, grads, layer)
        return -self.lr[layer] * (pk * keys).sum(-1, keepdim=True) * pg

"""How one edited layer's per-token shifts S_j = g_theta(u_j, dL/dv_j) become its S*: the one place where MALMEN and
MEND differ (editor.aggregation). Each kind builds what its layer needs once per step, gives S*, and pulls stage 2's
G = dL_meta/dW~ back into the hyper-network (and lambda).

Shapes, rows are cached tokens: U (n, d_in), dL/dV (n, d_out), D (n, d_out); S* and G (d_out, d_in).
  normal_equation (MALMEN, eq. 6):  d_j = S_j u_j,  S* = D^T U (U^T U + lambda I)^{-1}
      stage 2 (Theorems 1, 2):  M = G (U^T U + lambda I)^{-1},  dL/dD = U M^T,  dL/dlambda = -<M, S*>,
      then the proxy loss <dL/dD, D(theta)> back-propagated through the hyper-network in batches
  sum (MEND as the paper re-implements it, A.7; the shifts of A.2):  S* = sum_j S_j = -eta G~^T U~
      stage 2: the proxy loss <G, S*(theta)> = -eta sum_j g~_j^T G u~_j, in batches
"""
import torch

from editor.normal_equation import NormalEquation


class Solved:
    """MALMEN's aggregation: the normal equation of the layer, built and factored once (editor/normal_equation.py)."""

    def __init__(self, editor, name: str, keys: torch.Tensor, grads: torch.Tensor, form: str | None = None):
        self.editor, self.keys, self.grads = editor, keys, grads
        self.net, self.layer = editor.network(name)
        with editor.phase("solve"):  # U^T U + lambda I (or U U^T + lambda I), factored
            self.system = NormalEquation(name, keys, editor.regularizer(name), editor.regularize,
                                         editor.batch_size, form)

    def shift(self) -> torch.Tensor:
        """S* (d_out, d_in); differentiable in theta and lambda when grad is enabled."""
        with self.editor.phase("hyper-network"):
            diffs = torch.cat([self.net.value_diffs(k, g, self.layer)  # D (n, d_out)
                               for _, k, g in self.editor.batches(self.keys, self.grads)])
        with self.editor.phase("solve"):
            return self.system.shift(diffs)

    def pull_back(self, grad_w: torch.Tensor, shift: torch.Tensor) -> None:
        """Accumulate dL_meta/dtheta and dL_meta/dlambda in .grad from G = `grad_w`; `shift` is this layer's S*."""
        grad_d, inner = self.system.pull_back(grad_w, shift)  # dL/dD (n, d_out) = U M^T, <M, S*>
        if self.editor.regularize:  # dL/dlambda = -<M, S*>, chained through lambda = exp(log_lambda)
            (-inner * self.editor.regularizer(self.system.name)).backward()
        for s, k, g in self.editor.batches(self.keys, self.grads):
            (grad_d[s] * self.net.value_diffs(k, g, self.layer)).sum().backward()


class Summed:
    """MEND's aggregation (the paper's re-implementation, A.7): the rank-one shifts summed; no lambda."""

    def __init__(self, editor, name: str, keys: torch.Tensor, grads: torch.Tensor, form: str | None = None):
        self.editor, self.keys, self.grads = editor, keys, grads
        self.net, self.layer = editor.network(name)

    def shift(self) -> torch.Tensor:
        total = 0
        for _, k, g in self.editor.batches(self.keys, self.grads):
            with self.editor.phase("hyper-network"):
                pk, pg = self.net(k, g, self.layer)  # U~, G~ of the batch
            with self.editor.phase("solve"):
                total = total + pg.T @ pk  # (d_out, d_in)
        return -self.net.eta()[self.layer] * total

    def pull_back(self, grad_w: torch.Tensor, shift: torch.Tensor) -> None:
        for _, k, g in self.editor.batches(self.keys, self.grads):
            pk, pg = self.net(k, g, self.layer)
            (-self.net.eta()[self.layer] * ((pg @ grad_w) * pk).sum()).backward()


AGGREGATIONS = {"normal_equation": Solved, "sum": Summed}  # editor.aggregation

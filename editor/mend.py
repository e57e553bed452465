"""MEND as re-implemented by the paper (A.7): MALMEN's hyper-network and memory-economic training,
but the rank-1 shifts S_j = -eta g~_j u~_j^T are summed (Mitchell et al. 2022) instead of solved for.

S* = sum_j S_j = -eta G~^T U~ (d_out, d_in), with G~ (n, d_out) and U~ (n, d_in) (paper A.2).
Stage 2 pulls back G = dL_meta/dW~ by the proxy loss <G, S*(theta)> = -eta sum_j g~_j^T G u~_j.
"""
import torch

from editor.malmen import MALMEN


class MEND(MALMEN):
    """Sum of parameter shifts; no regulariser lambda."""

    name = "mend"

    def __init__(self, *args, label: str | None = None, **kwargs):
        kwargs["regularize"] = False  # lambda does not exist here; keep it out of the optimiser
        super().__init__(*args, **kwargs)
        if label is not None:  # e.g. "malmen (ablation=sum)": messages name what the user asked for
            self.label = label

    def system(self, name: str, keys: torch.Tensor) -> None:
        """No normal equation to build: the shifts are summed."""
        return None

    def aggregate(self, name: str, keys: torch.Tensor, grads: torch.Tensor, system=None) -> torch.Tensor:
        net, layer = self._net(name)
        total = 0
        for s in self._chunks(keys.shape[0]):
            pk, pg = net(keys[s].to(self.device), grads[s].to(self.device), layer)
            total = total + pg.T @ pk  # (d_out, d_in)
        return -net.eta()[layer] * total

    def pull_back(self, name: str, keys: torch.Tensor, grads: torch.Tensor, grad_w: torch.Tensor,
                  shift: torch.Tensor, system=None) -> None:
        net, layer = self._net(name)
        for s in self._chunks(keys.shape[0]):
            pk, pg = net(keys[s].to(self.device), grads[s].to(self.device), layer)
            (-net.eta()[layer] * ((pg @ grad_w) * pk).sum()).backward()

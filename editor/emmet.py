"""EMMET (Gupta et al., "A Unified Framework for Model Editing"): MEMIT's objective with equality constraints.

Minimise the change on preserved keys, |Delta K_0|^2 with K_0 K_0^T ~ C = lam E[k k^T] (the scaled
key statistics), subject to Delta K = R for the edited keys. The Lagrangian gives
    Delta = R (K^T C^{-1} K + lam_e I)^{-1} K^T C^{-1},
with a small lam_e (0.1) for stability when K^T C^{-1} K is ill-conditioned. Keys, targets and
statistics are MEMIT's (editor.memit). EMMET's own settings edit ONE layer (GPT-J: layer 5, lam 1;
GPT-2 XL: layer 17, lam 1000), so the whole residual z - h goes to it; they are per model
(config/model/*.yaml, memit.emmet) and config/editor/emmet.yaml reads them. Given several layers,
the residual is spread over them as MEMIT's.

Multiplying out shows Delta (lam_e C + K K^T) = R K^T: EMMET is MEMIT's closed form with the
preservation weight lam_e lam instead of lam. The tests check this identity on real edits.
"""
import torch

from editor.memit import MEMIT, Check


def emmet_delta(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam_e: float,
                check: Check = lambda a, what: None) -> torch.Tensor:
    """Delta = R (K^T C^-1 K + lam_e I)^-1 K^T C^-1 (d_out, d_in); K (d_in, n), R (d_out, n), C (d_in, d_in)."""
    check(cov, "the scaled key statistics lambda C")
    c_inv_k = torch.linalg.solve(cov, keys)  # (d_in, n)
    gram = keys.T @ c_inv_k + lam_e * torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)  # (n, n)
    check(gram, "K^T (lambda C)^-1 K + lambda_e I")
    # R gram^{-1} = (gram^{-1} R^T)^T (gram is symmetric); (C^{-1} K)^T = K^T C^{-1} (C is symmetric)
    return torch.linalg.solve(gram, resid.T).T @ c_inv_k.T


class EMMET(MEMIT):
    """EMMET: MEMIT's keys, targets and statistics; the equality-constrained closed form per layer."""

    name = "emmet"

    def __init__(self, *args, lam_e: float, **kwargs):
        super().__init__(*args, **kwargs)  # kwargs["lam"] scales C: the "scaled key covariance"
        self.lam_e = lam_e

    def layer_delta(self, name: str, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        fix = (f"for lambda C, more statistics text ({self.more_text}) or a larger editor.lam (now {self.lam:g}); "
               f"for K^T (lambda C)^-1 K + lambda_e I, a larger editor.lam_e (now {self.lam_e:g})")
        return emmet_delta(keys, resid, self.lam * cov, self.lam_e, self.conditioned(name, fix))

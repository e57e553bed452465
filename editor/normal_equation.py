"""The normal equation of one edited layer, built and factored once per step (paper eq. 6, Thm. 1, 2).

With n cached tokens, keys K (n, d_in), value differences D (n, d_out) and lambda > 0:
  S* = D^T K (K^T K + lambda I)^{-1}                                      (d_out, d_in)
Stage 2 pulls G = dL/dS* (d_out, d_in) back with M = G (K^T K + lambda I)^{-1}:
  dL/dD = K M^T (n, d_out),   dL/dlambda = -<M, S*>.
Two exact forms of the same numbers, chosen by which matrix is smaller:
  primal  A = K^T K + lambda I (d_in, d_in):  S*^T = A^{-1} K^T D,  M^T = A^{-1} G^T
  dual    B = K K^T + lambda I (n, n):  A^{-1} K^T = K^T B^{-1} (push-through identity), so
          S*^T = K^T Q with Q = B^{-1} D,  dL/dD = P = B^{-1} K G^T,  <M, S*> = <P, Q>
The dual form serves n < d_in (GPT-2 at m = 64: 192 tokens against d_in = 3072), the primal one the
rest. Either matrix is factored once (Cholesky, symmetric positive definite for lambda > 0) and the
factor serves S* and stage 2. lambda = 0 (the no-regularisation ablation) keeps the primal form and
the general (LU) solve, which says when K^T K is singular; so does a matrix that is numerically not
positive definite.
"""
import torch


class SolveError(ValueError):
    """The normal equation of one layer has no finite solution."""

    def __init__(self, module: str, lam: float, reason: str):
        super().__init__(f"normal equation of module {module} (lambda = {lam:.3g}): {reason}; K^T K + lambda I is "
                         "singular or ill-conditioned: use a larger editor.lambda_init (and editor.regularize=true)")


class NormalEquation:
    """One layer's system, factored at construction. `keys` (n, d_in) where the cache lives; `lam` a
    scalar tensor on the solve's device (differentiable in end-to-end training); `regularized`:
    lambda > 0 is guaranteed; `chunk`: key rows moved to the device at a time in the primal form (the
    dual one, n < d_in, holds K there: at most d_in^2 numbers); `form`: "primal" or "dual" to force
    one (tests), else the smaller."""

    def __init__(self, name: str, keys: torch.Tensor, lam: torch.Tensor, regularized: bool, chunk: int,
                 form: str | None = None):
        n, d_in = keys.shape
        self.name, self.lam, self.device = name, lam, lam.device
        self.form = form or ("dual" if regularized and n < d_in else "primal")
        self.chunks = [slice(i, i + chunk) for i in range(0, n, chunk)]
        eye = lambda k: torch.eye(k, device=self.device, dtype=keys.dtype)  # noqa: E731
        if self.form == "dual":
            self.keys = keys.to(self.device)
            self.matrix = self.keys @ self.keys.T + lam * eye(n)  # (n, n)
        else:
            self.keys = keys
            self.matrix = lam * eye(d_in)  # (d_in, d_in)
            for s in self.chunks:
                k = keys[s].to(self.device)
                self.matrix = self.matrix + k.T @ k
        self.chol = None
        if regularized:
            chol, info = torch.linalg.cholesky_ex(self.matrix)
            self.chol = chol if int(info) == 0 else None  # one read per layer
        self.q = None  # dual: B^{-1} D of the last `shift`, for <M, S*> in stage 2

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """matrix^{-1} rhs (two triangular solves with the factor, else LU); SolveError if singular."""
        try:
            if self.chol is not None:
                return torch.cholesky_solve(rhs, self.chol)
            return torch.linalg.solve(self.matrix, rhs)
        except torch.linalg.LinAlgError as err:  # exactly singular: lambda = 0 and fewer tokens than d_in
            raise SolveError(self.name, float(self.lam), str(err)) from err

    def shift(self, diffs: torch.Tensor) -> torch.Tensor:
        """S* (d_out, d_in) for value differences D (n, d_out); differentiable in D and lambda."""
        if self.form == "dual":
            q = self.solve(diffs)  # (n, d_out)
            self.q = q.detach()
            shift = q.T @ self.keys
        else:
            rhs = sum(self.keys[s].to(self.device).T @ diffs[s] for s in self.chunks)  # K^T D (d_in, d_out)
            shift = self.solve(rhs).T
        if not torch.isfinite(shift).all():  # one check per layer; NaN shifts would silently ruin the model
            raise SolveError(self.name, float(self.lam), "non-finite values in S*")
        return shift

    @torch.no_grad()
    def pull_back(self, grad_w: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dL/dD (n, d_out), <M, S*>) for G = dL/dS* (d_out, d_in) and this system's S* = `shift`."""
        if self.form == "dual":
            if self.q is None:
                raise RuntimeError("NormalEquation.pull_back (dual form) needs shift() to have run first")
            p = self.solve(self.keys @ grad_w.T)  # (n, d_out) = K M^T
            return p, (p * self.q).sum()
        m_t = self.solve(grad_w.T)  # (d_in, d_out) = M^T, the matrix is symmetric
        grad_d = torch.cat([self.keys[s].to(self.device) @ m_t for s in self.chunks])  # (n, d_out) = K M^T
        return grad_d, (m_t.T * shift).sum()

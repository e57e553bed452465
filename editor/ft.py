"""FT baseline (paper A.5): fine-tune the configured modules on the edit tuples with AdamW.

Weights and biases of the modules are copied into float32 leaves (the model may be bf16), trained
for `n_epochs` over the edit batches on -log p(y | x), and returned as shifts from the originals.
"""
import torch
from torch import nn
from tqdm import tqdm

from editor.base import Editor, Shifts
from model.lm import logits, nll, to_device


class FT(Editor):
    """Fine-tuning of a few modules, no meta-training."""

    name = "ft"

    def __init__(self, model: nn.Module, family: str, modules: dict[str, nn.Module], *,
                 lr: float, weight_decay: float, n_epochs: int, device="cpu"):
        super().__init__(model, family, device)
        self.names = [f"{m}.{p}" for m, mod in modules.items() for p, _ in mod.named_parameters()]
        self.lr, self.weight_decay, self.n_epochs = lr, weight_decay, n_epochs

    def edited_modules(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[0] for n in self.names})

    def edit(self, batches: list[dict]) -> Shifts:
        originals = {n: self.model.get_parameter(n).detach() for n in self.names}
        leaves = {n: w.float().clone().requires_grad_() for n, w in originals.items()}
        opt = torch.optim.AdamW(leaves.values(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in tqdm(range(self.n_epochs), desc="FT epochs", leave=False, dynamic_ncols=True):
            for batch in batches:
                batch = to_device(batch, self.device)
                params = {n: w.to(originals[n].dtype) for n, w in leaves.items()}
                loss = nll(logits(self.model, batch, self.family, params), batch, self.family).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return {n: (w.detach() - originals[n].float()) for n, w in leaves.items()}

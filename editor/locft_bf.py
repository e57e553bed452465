"""LocFT-BF ("Fine-tuning Done Right in Model Editing"): breadth-first fine-tuning of one module.

All edits are shuffled into mini-batches (100) and the whole set is visited once per epoch (up to 25),
instead of fitting each batch of edits in turn. Adam (lr 5e-4) tunes the weight of one localised
module on the target tokens plus an end-of-sequence token (EOS for causal LMs, </s> for T5; the
classifier has one label). The loss of an example is the mean NLL over its target tokens, and a
batch's loss the mean over its examples, so a long answer weighs as much as a short one. A step
whose batch loss is under `loss_threshold` (1e-2) is skipped, and training stops once the epoch's
loss, the batch losses weighted by batch size (the mean over all examples), is under it.

The EOS target is added here, to the tensors of the edit batches (`with_eos`), so the shared
Collator and the evaluation keep their answer-only labels.
"""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data.collate import IGNORE
from editor.base import Editor, Shifts, finite
from model.lm import logits, nll, to_device
from model.load import resolve_modules


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of all examples; (B, T) tensors right-padded to the longest (labels with IGNORE)."""
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if parts[0].dim() == 2:  # padding value is irrelevant under the masks, except for labels
            width = max(p.shape[1] for p in parts)
            value = IGNORE if key == "labels" else 0
            parts = [F.pad(p, (0, width - p.shape[1]), value=value) for p in parts]
        out[key] = torch.cat(parts)
    return out


def with_eos(batch: dict[str, torch.Tensor], eos_id: int, family: str = "causal") -> dict[str, torch.Tensor]:
    """The batch with targets that go on to `eos_id` after the answer ((B, T + 1) on the side that
    predicts): the last answer token, which the Collator never feeds in, becomes the input that
    predicts EOS. Causal: the input; seq2seq: the decoder input."""
    ids_key, mask_key = ("input_ids", "attention_mask") if family == "causal" else \
        ("decoder_input_ids", "decoder_attention_mask")
    ids, mask, labels = (F.pad(batch[k], (0, 1), value=v) for k, v in
                         ((ids_key, eos_id), (mask_key, 0), ("labels", IGNORE)))
    rows, ends = torch.arange(len(ids)), batch[mask_key].sum(1)  # first position after each sequence
    ids[rows, ends], mask[rows, ends], labels[rows, ends] = labels[rows, ends - 1], 1, eos_id
    return {**batch, ids_key: ids, mask_key: mask, "labels": labels}


class LocFTBF(Editor):
    """Breadth-first fine-tuning of one module's weight; no meta-training; any model family."""

    name = "locft_bf"

    def __init__(self, model: nn.Module, family: str, module: str, *, lr: float, batch_size: int, n_epochs: int,
                 loss_threshold: float, eos_id: int | None, seed: int, device="cpu"):
        super().__init__(model, family, device)
        if family != "classifier" and eos_id is None:
            raise ValueError("editor locft_bf: the tokenizer has no EOS token to append to the targets")
        resolve_modules(model, [module], "editor.module (default: the model config's locft_module)")
        self.param = f"{module}.weight"
        self.lr, self.batch_size, self.n_epochs = lr, batch_size, n_epochs
        self.loss_threshold, self.eos_id, self.seed = loss_threshold, eos_id, seed
        self.epochs_run = 0  # of the last edit (early stopping)
        self.epoch_losses: list[float] = []  # of the last edit: each epoch's loss, the mean over its examples
        self.steps_taken = 0  # of the last edit: Adam steps (mini-batches under loss_threshold take none)

    def loss(self, batch: dict, params: dict) -> torch.Tensor:
        """Mean over the batch's examples of each one's mean NLL per target token (binary cross-entropy
        for the classifier)."""
        per_example = nll(logits(self.model, batch, self.family, params), batch, self.family)  # (B,) summed
        if self.family == "classifier":
            return per_example.mean()
        return (per_example / (batch["labels"] != IGNORE).sum(1)).mean()

    def diagnostics(self) -> dict:
        """The last edit: epochs run, Adam steps taken (ceil(m / batch_size) per epoch at most, so 25 in
        all at m <= 100), whether the epoch loss reached loss_threshold, and each epoch's loss (nats per
        target token, the mean over examples; None where not finite)."""
        if not self.epoch_losses:
            return {}
        return {"epochs": self.epochs_run, "steps": self.steps_taken,
                "stopped_early": self.epoch_losses[-1] < self.loss_threshold,
                "epoch_losses": [finite(x) for x in self.epoch_losses]}

    def edited_modules(self) -> list[str]:
        return [self.param.rsplit(".", 1)[0]]

    def edit(self, batches: list[dict]) -> Shifts:
        data = concat(batches)
        if self.family != "classifier":
            data = with_eos(data, self.eos_id, self.family)
        original = self.model.get_parameter(self.param).detach()
        leaf = original.float().clone().requires_grad_()
        opt = torch.optim.Adam([leaf], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        n = len(data["input_ids"])
        self.epoch_losses, self.steps_taken = [], 0
        for epoch in tqdm(range(self.n_epochs), desc="LocFT-BF epochs", leave=False, dynamic_ncols=True):
            total = 0.0  # sum over batches of batch loss * batch size
            for idx in torch.randperm(n, generator=gen).split(self.batch_size):
                batch = to_device({k: v[idx] for k, v in data.items()}, self.device)
                loss = self.loss(batch, {self.param: leaf.to(original.dtype)})
                value = loss.item()  # decides the step: one read-back per mini-batch
                total += value * len(idx)
                if value < self.loss_threshold:
                    continue  # this mini-batch is already learnt: no step
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.steps_taken += 1
            self.epochs_run = epoch + 1
            self.epoch_losses.append(total / n)
            if total / n < self.loss_threshold:
                break
        return {self.param: leaf.detach() - original.float()}

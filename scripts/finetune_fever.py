"""Fine-tune the FEVER classifier before editing (paper A.4): python scripts/finetune_fever.py model=M [key=value ...]

All parameters train with Adam at lr 3e-5. Phase 1 trains on data.train_path alone and picks the
epoch count with the best accuracy on data.valid_path; phase 2 trains again from the pre-trained
weights on train + valid for that many epochs. The result is the full BertClassifier state dict,
<run dir>/classifier.safetensors, which `python main.py model=M data=fever model.checkpoint=...`
loads; finetune.json beside it holds the accuracies. Config: config/finetune.yaml.

The data files are the paper's FEVER edit records, whose `alt` is the edit label, the opposite of
the gold label: the classifier is fine-tuned on the claims (`prompt`) with label = not alt.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from safetensors.torch import save  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.collate import Collator  # noqa: E402
from data.records import DataError, EditRecord, load_records  # noqa: E402
from model.lm import logits, nll, to_device  # noqa: E402
from model.load import load_model  # noqa: E402
from util import atomic_write  # noqa: E402

log = logging.getLogger("finetune")
CHECKPOINT = "classifier.safetensors"


def gold_claims(records: list[EditRecord]) -> tuple[list[str], list[bool]]:
    """Claims and their fine-tuning labels (True = SUPPORTS): the opposite of each record's edit label."""
    return [r.prompt for r in records], [not r.answer for r in records]


@torch.no_grad()
def accuracy(model: nn.Module, collator: Collator, prompts: list[str], labels: list[bool], batch_size: int,
             device: torch.device) -> float:
    """Share of claims whose logit sign matches the label (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(prompts), batch_size):
        batch = to_device(collator(prompts[i: i + batch_size], labels[i: i + batch_size]), device)
        correct += int(((logits(model, batch, "classifier") > 0).float() == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(prompts)


def train(model: nn.Module, collator: Collator, prompts: list[str], labels: list[bool], *, n_epochs: int,
          lr: float, batch_size: int, seed: int, device: torch.device,
          after_epoch: Callable[[int], None] | None = None) -> list[float]:
    """Fine-tune every parameter with Adam for `n_epochs`; mean training loss per epoch."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()  # dropout on, as in BERT fine-tuning
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for epoch in range(n_epochs):
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        total = 0.0
        for i in tqdm(range(0, len(order), batch_size), desc=f"fine-tune epoch {epoch + 1}", dynamic_ncols=True):
            idx = order[i: i + batch_size]
            batch = to_device(collator([prompts[j] for j in idx], [labels[j] for j in idx]), device)
            loss = nll(logits(model, batch, "classifier"), batch, "classifier").mean()  # binary CE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
        log.info("epoch %d: training loss %.4f", epoch + 1, losses[-1])
        if after_epoch is not None:
            after_epoch(epoch + 1)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def finetune(build: Callable[[], tuple[nn.Module, object]], train_set: list[EditRecord],
             valid_set: list[EditRecord], *, lr: float, batch_size: int, max_epochs: int,
             n_epochs: int | None, seed: int, device: torch.device) -> tuple[nn.Module, object, dict]:
    """A.4: pick the epoch count on `valid_set` (unless `n_epochs`), then train on train + valid."""
    report: dict = {"n_train": len(train_set), "n_valid": len(valid_set)}
    if n_epochs is None:
        model, tok = build()
        collator = Collator(tok, "classifier")
        valid = gold_claims(valid_set)
        curve: list[float] = []
        report["phase1_loss"] = train(
            model, collator, *gold_claims(train_set), n_epochs=max_epochs, lr=lr, batch_size=batch_size,
            seed=seed, device=device,
            after_epoch=lambda e: curve.append(accuracy(model, collator, *valid, batch_size, device)))
        report["valid_accuracy"] = curve  # after epoch 1, 2, ...
        n_epochs = 1 + max(range(len(curve)), key=lambda e: (curve[e], -e))  # ties: fewer epochs
        log.info("validation accuracy per epoch %s: %d epochs", [round(a, 4) for a in curve], n_epochs)
        del model
    report["n_epochs"] = n_epochs
    model, tok = build()  # again from the pre-trained weights, with the same head initialisation
    report["phase2_loss"] = train(model, Collator(tok, "classifier"), *gold_claims(train_set + valid_set),
                                  n_epochs=n_epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
    return model, tok, report


def save_classifier(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """The full state dict as safetensors (atomic: temp file + rename); `metadata` goes in its header."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(state, metadata=metadata))


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict, nn.Module]:
    """Fine-tune cfg.model on cfg.data; write classifier.safetensors and finetune.json to out_dir."""
    start = time.time()
    if cfg.model.family != "classifier" or cfg.data.format != "fever":
        raise ValueError(f"fine-tuning is for the FEVER classifier: got model={cfg.model.name} "
                         f"({cfg.model.family}), data={cfg.data.name} ({cfg.data.format})")
    device = torch.device(cfg.model_device)
    tiny = OmegaConf.to_container(cfg.model.tiny) if cfg.model.tiny else None

    def build():
        torch.manual_seed(cfg.seed)  # the head (and a tiny model) start the same in both phases
        return load_model(arch=cfg.model.arch, family=cfg.model.family, name_or_path=cfg.model.name_or_path,
                          tokenizer=cfg.model.tokenizer, dtype=cfg.model.dtype, tiny=tiny,
                          checkpoint=cfg.model.checkpoint, device=str(device))

    def read(path: str) -> list[EditRecord]:
        records = load_records(path, cfg.data.format)
        return records if cfg.max_records is None else records[: cfg.max_records]

    model, tok, report = finetune(build, read(cfg.data.train_path), read(cfg.data.valid_path), lr=cfg.lr,
                                  batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, n_epochs=cfg.n_epochs,
                                  seed=cfg.seed, device=device)
    if cfg.test_path is not None:
        test = read(cfg.test_path)
        report["n_test"] = len(test)
        report["test_accuracy"] = accuracy(model, Collator(tok, "classifier"), *gold_claims(test),
                                           cfg.batch_size, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT
    save_classifier(model, path, {"model": cfg.model.name, "name_or_path": str(cfg.model.name_or_path),
                                  "n_epochs": str(report["n_epochs"]), "lr": str(cfg.lr)})
    report.update(checkpoint=str(path), time_s=time.time() - start,
                  use=f"python main.py model={cfg.model.name} data=fever model.checkpoint={path}",
                  config=OmegaConf.to_container(cfg, resolve=True))
    (out_dir / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, model


@hydra.main(version_base="1.3", config_path="../config", config_name="finetune")
def main(cfg: DictConfig) -> None:
    try:
        report, _ = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (DataError, FileNotFoundError, ValueError) as err:  # bad input: one message, no traceback
        log.debug("error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if "valid_accuracy" in report:
        print("validation accuracy per epoch:", " ".join(f"{a:.4f}" for a in report["valid_accuracy"]))
    print(f"trained {report['n_epochs']} epochs on {report['n_train'] + report['n_valid']} claims")
    if "test_accuracy" in report:
        print(f"held-out accuracy {report['test_accuracy']:.4f} on {report['n_test']} claims")
    print(f"checkpoint {report['checkpoint']}\nedit it: {report['use']}")


if __name__ == "__main__":
    main()

"""Are the keys MALMEN edits at subject-specific? Per layer, the key at the token that outputs the answer's first
token (the last prompt token; MALMEN's token=ans keys), for each edit of the first validation group, its
equivalent prompt (same subject, other wording) and its unrelated prompt (CounterFact: a neighborhood prompt,
another subject with the same relation).

An edit reaches key u' in proportion to how much of u' lies along its own key (S* u' = sum_i d_i h_i(u')). If a
layer's keys put an edit's paraphrase no nearer than its neighbor, whatever generalises to the paraphrase reaches
the neighbor too: GS and neighborhood trade. Printed per layer (keys centred on the group's mean edit key, whose
shared part every prompt has):
  cos(edit, paraphrase), cos(edit, neighbor), cos(edit, other edits)   means over the group
  specific   the share of edits whose paraphrase is nearer than their neighbor

    python scripts/key_geometry.py experiment=massive_counterfact split_dir=DIR/split [data.n_edits=128]
                                   [+geometry.module=mlp.down_proj]
"""
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.collate import Collator  # noqa: E402
from data.groups import edit_groups  # noqa: E402
from data.records import load_records  # noqa: E402
from model.lm import answer_mask, to_device  # noqa: E402
from pipeline.experiment import load, materialize  # noqa: E402
from pipeline.preflight import check_threads  # noqa: E402
from util import set_threads  # noqa: E402


def first_answer_keys(model, modules: dict, batches: list[dict], family: str, device) -> dict[str, torch.Tensor]:
    """Per module, the input at each row's last prompt token (the first answer token's output): (rows, d_in)."""
    seen: dict[str, list] = {n: [] for n in modules}
    where: list = []

    def hook(name):
        return lambda mod, args: seen[name].append(args[0][where[-1]].detach())
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                mask = answer_mask(batch, family)  # (B, T) positions that output an answer token
                first = mask.float().argmax(1)  # the first of them per row
                where.append((torch.arange(len(first)), first))
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


@hydra.main(version_base="1.3", config_path="../config", config_name="config")
def main(cfg: DictConfig) -> None:
    check_threads(cfg.threads)
    set_threads(cfg.threads)
    materialize(cfg)
    model, tokenizer = load(cfg)
    family, device = cfg.model.family, torch.device(cfg.model_device)
    suffix = cfg.get("geometry", {}).get("module", "mlp.down_proj")
    modules = {n: m for n, m in model.named_modules() if n.endswith(suffix)}
    records = load_records(cfg.data.valid_path, cfg.data.format)
    group = next(edit_groups(records, cfg.data.n_edits, cfg.data.batch_size, Collator(tokenizer, family),
                             seed=cfg.seed, shuffle=True, path=cfg.data.valid_path))  # as validate's first group
    keys = {}
    for part in ("edit", "equiv", "unrel"):  # batches come sorted by length: back to the group's order
        found, order = first_answer_keys(model, modules, getattr(group, part), family, device), group.order[part]
        keys[part] = {n: torch.empty_like(k).index_copy_(0, torch.tensor(order), k) for n, k in found.items()}
    m = len(group.records)
    print(f"\n{cfg.model.name}, {cfg.data.name}, first validation group of m = {m}; keys at the last prompt token, "
          f"centred on the group's mean edit key")
    print(f"{'module':34}{'para':>7}{'nbr':>7}{'other':>7}{'specific':>10}")
    for n in modules:
        centre = keys["edit"][n].mean(0, keepdim=True)
        e, p, u = (keys[part][n] - centre for part in ("edit", "equiv", "unrel"))  # (m, d_in) each
        para, nbr = cosines(e, p), cosines(e, u)
        unit = torch.nn.functional.normalize(e, dim=1)
        gram = unit @ unit.T  # (m, m)
        other = (gram.sum() - gram.diagonal().sum()) / (m * (m - 1))
        print(f"{n:34}{para.mean():7.3f}{nbr.mean():7.3f}{other:7.3f}{(para > nbr).float().mean():10.3f}")


if __name__ == "__main__":
    main()

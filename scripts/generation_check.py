"""Does greedy decoding give what the generated scores say, on a real model? (model/generate.py)

python scripts/generation_check.py [main.py overrides ...]   e.g. experiment=massive_counterfact split_dir=DIR editor=memit

Builds the model and editor of the config as main.py would, takes the first validation group, and before and
after editing it compares, tuple by tuple, the exact match that `generated` reports (every teacher-forced argmax
right, model/lm.exact) with transformers' `generate` (batched, KV cache) decoding the answer's length, for the
edit, equivalent and unrelated tuples. Prints the counts that agree and the seconds each way; exit 1 if any
tuple disagrees (a near-tie that the two computations round differently would show here).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hydra import compose, initialize_config_dir  # noqa: E402


def main(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "config"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    import torch
    from data.collate import Collator
    from data.groups import edit_groups
    from data.records import load_records
    from editor.base import apply_shifts
    from model.generate import greedy
    from model.lm import answer_hits
    from pipeline.experiment import build_editor, load, materialize
    from util import seed_everything, set_threads
    set_threads(cfg.threads)
    materialize(cfg)
    seed_everything(cfg.seed)
    model, tok = load(cfg)
    family, device = cfg.model.family, torch.device(cfg.model_device)
    collator = Collator(tok, family)
    group = next(edit_groups(load_records(cfg.data.valid_path, cfg.data.format), cfg.data.n_edits, cfg.data.batch_size,
                             collator, seed=cfg.seed, shuffle=True, path=cfg.data.valid_path))
    editor = build_editor(cfg, model, tokenizer=tok)
    shifts = editor.edit_group(group)
    disagree = 0
    for state in ("before", "after"):
        with apply_shifts(model, shifts if state == "after" else {}, editor.label):
            for kind in ("edit", "equiv", "unrel"):
                batches = getattr(group, kind)
                started = time.time()
                exact = answer_hits(model, batches, family, device)[1]  # (N,)
                t_exact = time.time() - started
                started = time.time()
                decoded = greedy(model, batches, family, device)
                t_decode = time.time() - started
                targets = [row[row != -100].tolist() for b in batches for row in b["labels"]]
                match = torch.tensor([float(d == t) for d, t in zip(decoded, targets)])
                bad = int((match != exact).sum())
                disagree += bad
                print(f"{state:6} {kind:5}: exact match {exact.mean():.3f} from teacher forcing ({t_exact:.1f} s), "
                      f"{match.mean():.3f} by generate ({t_decode:.1f} s); {len(match) - bad}/{len(match)} tuples agree")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

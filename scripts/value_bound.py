"""How well could any hyper-network do? Free value differences D, optimised through the normal equation.

For the first validation group of m edits, D (n, d_out) per edited layer is a free tensor instead of
the hyper-network's output. S* = D^T K (K^T K + lambda I)^{-1} is applied as in MALMEN and D is
optimised with Adam on the meta loss of that very group (L_gen on its equivalent tuples + L_loc).
The ES/GS/LS reached bound what MALMEN's aggregation allows on this model; GS is optimistic (its
prompts are in the loss) and ES is not in the loss.

It also prints, per edited layer, how much room the keys leave for m independent edits: the number of
eigenvalues of K^T K above lambda, and the mean leverage h_jj = u_j^T (K^T K + lambda I)^{-1} u_j, the
share of an edit's own value difference that S* gives back at its key (S* u_j = sum_i h_ij d_i).

With +bound.with_edits=true the edit prompts join the loss: the bound then covers ES as well.

    python scripts/value_bound.py [main.py overrides] [+bound.steps=100] [+bound.lr=1.0]
                                  [+bound.lam=<editor.lambda_init>] [+bound.with_edits=false]
"""
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.collate import Collator  # noqa: E402
from data.groups import edit_groups  # noqa: E402
from data.records import load_records  # noqa: E402
from editor.base import apply_shifts, shifted, to_param_layout  # noqa: E402
from model.lm import kl, logits, nll  # noqa: E402
from model.load import resolve_modules  # noqa: E402
from model.trace import trace  # noqa: E402
from pipeline.experiment import evaluate, load, materialize  # noqa: E402
from pipeline.preflight import check_threads  # noqa: E402
from util import set_threads  # noqa: E402


@hydra.main(version_base="1.3", config_path="../config", config_name="config")
def main(cfg: DictConfig) -> None:
    bound = cfg.get("bound", {})
    steps, lr, lam = bound.get("steps", 100), bound.get("lr", 1.0), bound.get("lam", cfg.editor.lambda_init)
    with_edits = bool(bound.get("with_edits", False))
    check_threads(cfg.threads)
    set_threads(cfg.threads)
    materialize(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load(cfg)
    family, device = cfg.model.family, torch.device(cfg.model_device)
    records = load_records(cfg.data.valid_path, cfg.data.format)
    group = next(edit_groups(records, cfg.data.n_edits, cfg.data.batch_size, Collator(tokenizer, family),
                             seed=cfg.seed, shuffle=True, path=cfg.data.valid_path))  # as pipeline.experiment.validate
    modules = resolve_modules(model, list(cfg.editor.modules))
    cache = trace(model, modules, group.edit, family, cfg.editor.token, device, device)  # keys (n, d_in)
    diffs = {n: torch.zeros_like(g, requires_grad=True) for n, (_, g) in cache.items()}  # D (n, d_out)
    opt = torch.optim.Adam(diffs.values(), lr=lr)
    grams = {n: k.T @ k + lam * torch.eye(k.shape[1], device=device) for n, (k, _) in cache.items()}  # (d_in, d_in)

    def shifts() -> dict[str, torch.Tensor]:  # S* per layer in the parameter's layout
        return {f"{n}.weight": to_param_layout(modules[n], torch.linalg.solve(grams[n], k.T @ diffs[n]).T)
                for n, (k, _) in cache.items()}

    print(f"\nkeys of the first validation group (n = {len(group.records)} edits), lambda = {lam}")
    for n, (k, _) in cache.items():  # k (n, d_in)
        leverage = (k * torch.linalg.solve(grams[n], k.T).T).sum(1)  # h_jj (n,)
        above = int((torch.linalg.eigvalsh(grams[n]) > 2 * lam).sum())  # eigenvalues of K^T K above lambda
        print(f"  {n}: d_in {k.shape[1]}, eigenvalues above lambda {above}, mean leverage {leverage.mean():.3f}")
    with torch.no_grad():
        refs = [logits(model, b, family) for b in group.unrel]
    m = len(group.records)
    targets = group.equiv + group.edit if with_edits else group.equiv  # batches in L_gen
    for _ in (bar := tqdm(range(steps), desc="optimise D", dynamic_ncols=True)):
        params = {name: shifted(model.get_parameter(name), s) for name, s in shifts().items()}
        gen = sum(nll(logits(model, b, family, params), b, family).sum() for b in targets) / m
        loc = sum(kl(r, logits(model, b, family, params), b, family).sum() for r, b in zip(refs, group.unrel)) / m
        opt.zero_grad(set_to_none=True)
        (gen + cfg.editor.loc_coef * loc).backward()
        opt.step()
        bar.set_postfix(gen=f"{gen.item():.3f}", loc=f"{loc.item():.3f}")
    pre = evaluate(model, group, family, device)[0]
    with torch.no_grad(), apply_shifts(model, shifts()):
        post = evaluate(model, group, family, device)[0]
    print(f"\nm = {m}, lambda = {lam}, {steps} Adam steps on D, edit prompts in the loss: {with_edits}")
    print(f"{'':8}{'ES':>8}{'GS':>8}{'LS':>8}")
    for name, row in (("pre", pre), ("bound", post)):
        print(f"{name:8}" + "".join(f"{row[k]:8.3f}" for k in ("ES", "GS", "LS")))


if __name__ == "__main__":
    main()

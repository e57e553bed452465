"""Meta-train an editor and evaluate it: python main.py model=M data=D editor=E [key=value ...]

The one place that reads the Hydra config; everything else takes explicit arguments.
Writes results.json (and checkpoint.pt for editors that learn) in the Hydra run directory.
"""
import itertools
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data.collate import Collator
from data.groups import edit_groups, n_groups
from data.records import DataError, load_records
from data.synthetic import WorldConfig, write_world
from editor.base import Editor, apply_shifts
from editor.emmet import EMMET
from editor.ft import FT
from editor.locft_bf import LocFTBF
from editor.malmen import MALMEN
from editor.memit import MEMIT
from editor.mend import MEND
from editor.stats import wikitext_texts
from model.lm import success
from model.load import load_model, resolve_modules
from model.toy import ensure_toy_model
from util import Logger, load_checkpoint, peak_memory_mb, save_checkpoint, save_json, seed_everything

log = logging.getLogger("main")


def stats_texts(cfg: DictConfig) -> list[str]:
    """Text for MEMIT/EMMET's key statistics: prompts and NQ questions of the training records, or wikitext."""
    if cfg.editor.stats_source == "train":
        records = load_records(cfg.data.train_path, cfg.data.format)
        return [t for r in records for t in (r.prompt, r.unrel_prompt)]
    if cfg.editor.stats_source == "wikitext":
        return wikitext_texts()
    raise ValueError(f"editor.stats_source must be train or wikitext, got {cfg.editor.stats_source!r}")


def build_located(cfg: DictConfig, model: torch.nn.Module, tokenizer) -> Editor:
    """MEMIT, EMMET or LocFT-BF: editors without meta-training that edit located modules."""
    e, family = cfg.editor, cfg.model.family
    if e.name != "locft_bf" and family != "causal":
        raise ValueError(f"editor {e.name} edits causal LMs (GPT-2, GPT-J) at the last subject token; "
                         f"model {cfg.model.name} is {family}")
    key = "locft_module" if e.name == "locft_bf" else "memit"
    if cfg.model.get(key) is None:  # checked before the editor config's ${model.<key>...} is resolved
        raise ValueError(f"editor {e.name} needs model.{key} in the config of model {cfg.model.name} "
                         "(see README, Configuration)")
    if e.name == "locft_bf":
        return LocFTBF(model, family, e.module, lr=e.lr, batch_size=e.batch_size, n_epochs=e.n_epochs,
                       loss_threshold=e.loss_threshold, eos_id=tokenizer.eos_token_id, seed=cfg.seed,
                       device=cfg.model_device)
    kwargs = dict(layers=list(e.layers), module=e.module, lam=e.lam, n_steps=e.n_steps, lr=e.lr,
                  kl_coef=e.kl_coef, norm_coef=e.norm_coef, clamp_factor=e.clamp_factor,
                  n_prefixes=e.n_prefixes, prefix_words=e.prefix_words, batch_size=e.batch_size,
                  stats_texts=stats_texts(cfg), stats_source=e.stats_source, n_samples=e.n_samples,
                  stats_max_len=e.stats_max_len, stats_batch_size=e.stats_batch_size, cache_dir=cfg.cache_dir,
                  model_id=cfg.model.name_or_path, device=cfg.model_device)
    if e.name == "emmet":
        return EMMET(model, family, tokenizer, lam_e=e.lam_e, **kwargs)
    return MEMIT(model, family, tokenizer, **kwargs)


def build_editor(cfg: DictConfig, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                 tokenizer=None) -> Editor:
    """The editor named by cfg.editor, on the modules it edits (hyper-network in `dtype`)."""
    e, family = cfg.editor, cfg.model.family
    if e.name in ("memit", "emmet", "locft_bf"):
        return build_located(cfg, model, tokenizer)
    modules = resolve_modules(model, list(e.modules))
    if e.name == "ft":
        return FT(model, family, modules, lr=e.lr, weight_decay=e.weight_decay, n_epochs=e.n_epochs,
                  device=cfg.model_device)
    if e.name not in ("malmen", "mend"):
        raise ValueError(f"unknown editor {e.name!r}: choose malmen, mend, ft, memit, emmet or locft_bf")
    if e.aggregation not in ("normal_equation", "sum"):
        raise ValueError(f"editor.aggregation must be normal_equation or sum, got {e.aggregation!r}")
    # "Sum of parameter shifts" (Table 1) is exactly the paper's MEND re-implementation.
    cls = MEND if e.aggregation == "sum" else MALMEN
    editor = cls(model, family, modules, rank=e.rank, n_blocks=e.n_blocks, lr_init=e.lr_init,
                 lambda_init=e.lambda_init, meta_lr=e.meta_lr, loc_coef=e.loc_coef,
                 max_grad_norm=e.max_grad_norm, token=e.token, batch_size=e.batch_size,
                 regularize=e.regularize, device=cfg.editor_device, cache_device=e.cache_device,
                 dtype=dtype)
    if e.checkpoint:
        editor.load_state_dict(load_checkpoint(e.checkpoint))
    return editor


def evaluate(model, group, family: str, device) -> dict[str, float]:
    """ES, GS, LS of the model as it is now on one group of m edits."""
    return {name: float(success(model, batches, family, device).mean())
            for name, batches in (("ES", group.edit), ("GS", group.equiv), ("LS", group.unrel))}


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean of ES, GS, LS over validation groups."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("ES", "GS", "LS")}


def materialize(cfg: DictConfig) -> None:
    """Generate the synthetic world and pretrain the toy LM when the config asks for them (cached)."""
    if cfg.data.get("world") is not None and cfg.data.train_path is None:
        paths = write_world(WorldConfig(**cfg.data.world), Path(cfg.cache_dir) / "synthetic")
        cfg.data.train_path, cfg.data.valid_path = paths["train"], paths["valid"]
    if cfg.model.get("pretrain") is not None and cfg.model.name_or_path is None:
        if cfg.data.get("world") is None:
            raise ValueError(f"model={cfg.model.name} is pretrained on the synthetic world: use data=synthetic")
        facts = str(Path(cfg.data.train_path).with_name("facts.json"))
        cfg.model.name_or_path = ensure_toy_model(facts, [cfg.data.train_path, cfg.data.valid_path],
                                                  OmegaConf.to_container(cfg.model.pretrain), cfg.cache_dir)


def load(cfg: DictConfig) -> tuple[torch.nn.Module, object]:
    """The model and tokenizer of cfg.model on cfg.model_device."""
    return load_model(
        arch=cfg.model.arch, family=cfg.model.family, name_or_path=cfg.model.name_or_path,
        tokenizer=cfg.model.tokenizer, dtype=cfg.model.dtype,
        tiny=OmegaConf.to_container(cfg.model.tiny) if cfg.model.tiny else None,
        checkpoint=cfg.model.checkpoint, device=cfg.model_device)


def train(cfg: DictConfig, editor: Editor, collator: Collator, logger: Logger, run_dir: Path,
          config: dict) -> list[dict]:
    """Meta-train for cfg.n_epochs (capped by max_train_steps); checkpoint to run_dir."""
    records = load_records(cfg.data.train_path, cfg.data.format)
    m = cfg.data.n_edits
    total = cfg.n_epochs * n_groups(len(records), m)
    if cfg.max_train_steps is not None:
        total = min(total, cfg.max_train_steps)
    log_rows = []
    bar = tqdm(total=total, desc="meta-train", dynamic_ncols=True)
    for epoch in range(cfg.n_epochs):
        groups = edit_groups(records, m, cfg.data.batch_size, collator, seed=cfg.seed + epoch, shuffle=True,
                             path=cfg.data.train_path)
        for group in itertools.islice(groups, total - len(log_rows)):
            metrics = editor.meta_step(group)
            log_rows.append({"step": editor.step, "epoch": epoch, **metrics})
            logger.log({f"train/{k}": v for k, v in metrics.items()}, editor.step)
            bar.set_postfix(gen=f"{metrics['gen_loss']:.3f}", loc=f"{metrics['loc_loss']:.3f}")
            bar.update()
            if len(log_rows) % cfg.save_every == 0 or len(log_rows) == total:
                save_checkpoint({**editor.state_dict(), "config": config}, run_dir / "checkpoint.pt")
    bar.close()
    return log_rows


def validate(cfg: DictConfig, model, editor: Editor, collator: Collator, logger: Logger) -> list[dict]:
    """Per validation group of m edits: ES/GS/LS before editing, edit all m at once, after."""
    records = load_records(cfg.data.valid_path, cfg.data.format)
    m, device = cfg.data.n_edits, torch.device(cfg.model_device)
    groups = edit_groups(records, m, cfg.data.batch_size, collator, seed=cfg.seed, shuffle=False,
                         path=cfg.data.valid_path)
    n_valid = n_groups(len(records), m)
    if cfg.max_valid_steps is not None:
        n_valid = min(n_valid, cfg.max_valid_steps)
    rows = []
    for group in tqdm(itertools.islice(groups, n_valid), total=n_valid, desc="validate", dynamic_ncols=True):
        pre = evaluate(model, group, cfg.model.family, device)
        shifts = editor.edit_group(group)
        with apply_shifts(model, shifts):
            post = evaluate(model, group, cfg.model.family, device)
        rows.append({**post, "pre_edit": pre})
        logger.log({f"valid/{k}": v for k, v in post.items()}, editor.step + len(rows))
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (editors that learn) and validate; write and return the results dict."""
    start = time.time()
    if cfg.model.family == "classifier" and cfg.data.format != "fever":
        raise ValueError(f"model={cfg.model.name} is a binary FEVER classifier: it needs data=fever")
    materialize(cfg)
    seed_everything(cfg.seed)
    device = torch.device(cfg.model_device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer = load(cfg)
    collator = Collator(tokenizer, cfg.model.family)
    editor = build_editor(cfg, model, tokenizer=tokenizer)
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = Logger(cfg.logger, cfg.wandb.project, cfg.wandb.mode, config, run_dir)
    train_log = train(cfg, editor, collator, logger, run_dir, config) if editor.trainable and cfg.n_epochs > 0 else []
    valid_log = validate(cfg, model, editor, collator, logger)
    results = {
        "config": config,
        "train": train_log,
        "valid": valid_log,
        "final": mean_metrics(valid_log),
        "pre_edit": mean_metrics([v["pre_edit"] for v in valid_log]),
        "time_s": time.time() - start,
        "stats_time_s": editor.stats_time_s,  # MEMIT/EMMET key statistics; 0 when loaded from the cache
        "peak_memory_mb": peak_memory_mb(device),
    }
    save_json(results, run_dir / "results.json")
    logger.log({f"final/{k}": v for k, v in results["final"].items()}, editor.step + len(valid_log) + 1)
    logger.finish()
    return results


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, run_dir)
    except (DataError, FileNotFoundError, ValueError) as err:  # bad input: one message, no traceback
        log.debug("error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    f, p = results["final"], results["pre_edit"]
    print(f"\n{'':8}{'ES':>8}{'GS':>8}{'LS':>8}")
    print(f"{'pre':8}{p['ES']:8.3f}{p['GS']:8.3f}{p['LS']:8.3f}")
    print(f"{'post':8}{f['ES']:8.3f}{f['GS']:8.3f}{f['LS']:8.3f}")
    print(f"time {results['time_s']:.1f} s, peak memory {results['peak_memory_mb']:.0f} MB, results in {run_dir}")


if __name__ == "__main__":
    main()

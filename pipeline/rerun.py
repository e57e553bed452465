"""What a run does with what its run directory already holds, so that rerunning a command (a sweep: the same
hydra.sweep.dir) finishes what is missing and nothing else:
  results.json of this config        kept: nothing to do;
  results.json of another config     refused, naming the keys that differ (editor.resume=true: meta-train on);
  checkpoint.pt and no results.json  an interrupted meta-training (MALMEN, MEND): resumed from it.
Decided by main.py from the files alone, before torch is imported. Imports no torch: keep it so.
"""
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.registry import FACTS, META_TRAINED

# Keys that say where or how a run computes, not what it computes: a run that differs from a finished one only
# in these would give its results (threads: the summation order of floats; the pre-edit scores, the prefix states
# and their store, the checkpoints' frequency, logging: the same numbers).
NOT_RESULTS = ("threads", "data_dir", "cache_dir", "cache_pre_edit", "prefix_cache", "prefix_cache_gb", "prefix_store",
               "prefix_store_gb", "save_every", "save_every_minutes", "logger", "wandb", "edit", "editor.resume",
               *(f"editor.{k}" for k in FACTS if k != "name"))
# Paths a run fills in when its config leaves them null (experiment.materialize: the generated facts and the
# converted or pretrained model, from the config's own settings): null here matches the earlier run's path.
FILLED_IN = ("model.name_or_path", "data.train_path", "data.valid_path")


def earlier_run(cfg: DictConfig, run_dir: Path, multirun: bool = False) -> str | None:
    """'kept' when run_dir holds results.json of this config, 'resume' when it holds the checkpoint.pt of an
    unfinished meta-training (or editor.resume=true asks to train on), else None. ValueError: results.json of
    another config, unless editor.resume=true. `multirun`: the run is a sweep's job (the advice differs)."""
    results, resume = run_dir / "results.json", bool(cfg.editor.get("resume"))
    if results.is_file():
        diffs = differences(json.loads(results.read_text()).get("config") or {},
                            OmegaConf.to_container(cfg, resolve=True))
        if not diffs:
            return "kept"
        if not resume:
            where = ("give the sweep another hydra.sweep.dir, or a hydra.sweep.subdir that names every key it varies"
                     if multirun else "give it another hydra.run.dir")
            longer = {d.split(":")[0] for d in diffs} <= {"n_epochs", "max_train_steps"}  # a longer budget
            more = (", or add editor.resume=true to meta-train its checkpoint.pt on to this budget"
                    if longer and (run_dir / "checkpoint.pt").is_file() and cfg.editor.name in META_TRAINED else "")
            raise ValueError(f"{run_dir} holds results.json of another config, which this run would overwrite "
                             f"({'; '.join(diffs)}): {where}{more}")
    trains = cfg.editor.name in META_TRAINED and cfg.n_epochs > 0 and cfg.max_train_steps != 0
    return "resume" if (run_dir / "checkpoint.pt").is_file() and (resume or trains) else None


def differences(saved: dict, current: dict) -> list[str]:
    """'key: results.json X, this run Y' for each key whose value differs, but those in NOT_RESULTS."""
    a, b = flat(saved), flat(current)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if any(key == k or key.startswith(k + ".") for k in NOT_RESULTS):
            continue
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old != new and not (key in FILLED_IN and new is None):
            out.append(f"{key}: results.json {old!r}, this run {new!r}")
    return out


def flat(config: dict, prefix: str = "") -> dict:
    """{'a.b': value} for every leaf of a nested dict (a list is one value)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

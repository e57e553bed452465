"""Pre-edit ES/GS/LS of validation groups, computed once and reused by later runs.

Before editing, the metrics of a validation group depend only on the model, the validation data, the
tokenizer, m and how the records are grouped (the seed), not on the editor. A sweep over editors,
ablations or hyper-parameters therefore measures them once: they are stored as JSON under
cache_dir/pre_edit/<digest of the key>.json, one entry per group index (a longer validation run extends
the file, a shorter one reads its prefix). The key (`pre_edit_key`) names the data by its bytes' sha256
and the model by its folder's
files (name, size, modification time: a model re-saved in place is a new model), by its hub name, or,
for models built with random weights, by a hash of the weights themselves.
"""
import hashlib
import json
import os
from pathlib import Path

import torch

from data.records import file_sha256
from util import atomic_write


def _path_identity(path: str | None) -> object:
    """A local file or folder by its files' names, sizes and modification times; anything else as given."""
    if path is None or not os.path.exists(path):
        return path  # a hub name (or nothing)
    files = [Path(path)] if os.path.isfile(path) else sorted(p for p in Path(path).rglob("*") if p.is_file())
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]



def pre_edit_key(*, model: dict, model_device: str, data_path: str, data_format: str, n_edits: int, seed: int,
                 weights_hash: str | None, score_reduction: str | None = None, generate: bool = False) -> dict:
    """What the pre-edit metrics of a validation run depend on. `model`: the resolved model config;
    `weights_hash`: the weights' hash for a model without a name_or_path (random tiny models);
    `score_reduction`: data.score_reduction of CounterFact's scores (None for data without it); `generate`:
    data.generate (the entries then hold the generated scores and the unrelated prompts' greedy continuations)."""
    scores = {} if score_reduction is None else {"score_reduction": score_reduction}  # other data: keys unchanged
    if generate:
        scores["generate"] = True
    return {**scores, "model": {k: model.get(k) for k in ("arch", "family", "dtype", "tiny")},
            "name_or_path": _path_identity(model.get("name_or_path")), "weights": weights_hash,
            "tokenizer": _path_identity(model.get("tokenizer")), "checkpoint": _path_identity(model.get("checkpoint")),
            "device": torch.device(model_device).type, "data": file_sha256(data_path), "format": data_format,
            "n_edits": n_edits, "seed": seed, "torch": torch.__version__}


class PreEditScores:
    """The pre-edit scores of one key: per validation group, its ES/GS/LS before editing (and, with
    data.generate, its generated scores and greedy continuations), read from and written to one JSON file;
    `computed` and `loaded` count this run's groups of each kind. enabled=False (config cache_pre_edit:
    false): every group is computed, nothing is read or written."""

    def __init__(self, cache_dir: str | Path, key: dict, enabled: bool = True):
        self.enabled = enabled
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.path = Path(cache_dir) / "pre_edit" / f"{digest}.json"
        self.key, self.computed, self.loaded = key, 0, 0
        self.groups: dict[str, dict] = {}
        if enabled and self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
                if stored.get("key") == json.loads(json.dumps(key, default=str)):  # a digest collision is not reuse
                    self.groups = stored["groups"]
            except (ValueError, KeyError, TypeError):
                self.groups = {}  # unreadable: computed again and rewritten

    def get(self, index: int, compute) -> dict:
        """The metrics of group `index`: loaded, or `compute()`d and stored."""
        if str(index) in self.groups:
            self.loaded += 1
            return self.groups[str(index)]
        metrics = compute()
        self.computed += 1
        self.groups[str(index)] = metrics
        if not self.enabled:
            return metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"key": self.key, "groups": self.groups}, default=str, indent=1))
        return metrics

    def summary(self) -> dict:
        """For results.json: how many groups' pre-edit metrics were computed and loaded, and the file."""
        return {"computed": self.computed, "loaded": self.loaded, "file": str(self.path) if self.enabled else None}

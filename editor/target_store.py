"""MEMIT/EMMET's target vectors z, stored per request on disk, so that an interrupted massive edit (one group of
m = 512 takes about an hour on a CPU, most of it in the targets) continues where it stopped.

A request's z does not depend on the other requests it is optimised with (editor/locate.optimise_targets:
the loss is a sum, Adam acts per coordinate), so a z computed in one batch is the z of any other batch, up to
float rounding. The key is everything z depends on: the model's weights (their sha256), where z lives and is
injected, the context prefixes, the optimisation settings, and the request itself.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from util import load_checkpoint, save_checkpoint

FIELDS = ("z", "steps", "loss", "nll", "delta_ratio")  # per request: (d,) and four scalars


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class TargetStore:
    """The target vectors on disk: per request, its z (d,) and the terms of its optimisation (steps, loss, nll,
    delta_ratio), one file cache_dir/memit_targets/<digest of the setting>/<digest of the request>.pt;
    `hits` and `computed` count this editor's requests read from it and optimised."""

    def __init__(self, cache_dir: str | Path, setting: dict):
        self.folder = Path(cache_dir) / "memit_targets" / _digest(setting)[:20]
        self.setting, self.hits, self.computed = setting, 0, 0

    def path(self, request) -> Path:
        return self.folder / f"{_digest([request.prompt, request.subject, request.answer])[:32]}.pt"

    def get(self, request) -> dict[str, torch.Tensor] | None:
        """The stored z and terms of `request`, or None (not stored, or unreadable: computed again)."""
        path = self.path(request)
        if not path.is_file():
            return None
        try:
            values = load_checkpoint(path)
        except (OSError, RuntimeError, ValueError):
            return None
        if values.get("setting") != self.setting or values.get("request") != [request.prompt, request.subject,
                                                                               request.answer]:
            return None  # a digest collision is not reuse
        self.hits += 1
        return {k: values[k] for k in FIELDS}

    def put(self, request, values: dict[str, torch.Tensor]) -> None:
        """Store one request's z (d,) and terms (scalars), on the CPU, written atomically."""
        self.computed += 1
        save_checkpoint({"setting": self.setting, "request": [request.prompt, request.subject, request.answer],
                         **{k: values[k].detach().cpu() for k in FIELDS}}, self.path(request))

"""Editor checkpoints: refuse one trained for another model or layout; resume meta-training exactly.

A checkpoint is one dict {net, opt, step, config, train_log, rng}, written atomically by
util.save_checkpoint and read by util.load_checkpoint (weights_only=True: a file cannot run code).
`train_log` (the rows of results.json's `train`, one per meta-step taken) and `rng` (python, numpy,
torch and CUDA generator states) are what resumption needs beyond the hyper-network and optimiser.
Hyper-network tensors renamed since a checkpoint was written (editor/hypernet.RENAMED) are read under their
new names, before the checks compare them with this run's.
"""
import random
from pathlib import Path

import numpy as np
import torch

from editor.hypernet import INPUT_VERSION, rename_old_tensors
from model.trace import weight_shape
from pipeline.edit_facts import BASE_KEYS, base_model
from pipeline.preflight import check_checkpoint
from util import load_checkpoint

# What the hyper-network's weights depend on: the model and the modules it edits.
# editor.token too: a network trained on answer tokens has not seen the prompt tokens token=all adds.
LAYOUT_KEYS = ("model.arch", "model.name_or_path", "model.tiny", "editor.name", "editor.aggregation",
               "editor.regularize", "editor.modules", "editor.rank", "editor.n_blocks", "editor.token")
# What else fixes the meta-training trajectory: a resumed run must agree on these too.
TRAJECTORY_KEYS = ("seed", "model.dtype", "data.format", "data.train_path", "data.n_edits", "data.batch_size",
                   "editor.lr_init", "editor.lambda_init", "editor.meta_lr",
                   "editor.loc_coef", "editor.max_grad_norm", "editor.token", "editor.batch_size",
                   "editor.loss_reduction", "editor.eta_param", "editor.scale_lr", "editor.eta_search",
                   "editor.lambda_rel", "curriculum")
# keys added after checkpoints were written: a checkpoint without one was trained at this (the paper's) value
ADDED = {"editor.eta_param": "plain", "editor.scale_lr": None, "editor.eta_search": False, "editor.lambda_rel": None,
         "curriculum": None}
REQUIRED = ("net", "opt", "step", "config")
_ABSENT = "<absent>"


def lookup(config: dict, key: str):
    """config["a"]["b"] for key "a.b"; "<absent>" where a level is missing."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def config_differences(saved: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """'key: checkpoint X, this run Y' for every key whose value differs."""
    def value(config: dict, k: str):
        v = lookup(config, k)
        return ADDED[k] if v == _ABSENT and k in ADDED else v
    return [f"{k}: checkpoint {value(saved, k)!r}, this run {value(current, k)!r}"
            for k in keys if value(saved, k) != value(current, k)]


def net_differences(saved: dict, current: dict) -> list[str]:
    """Hyper-network tensors missing on either side or of another shape."""
    out = [f"hyper-network tensor {k}: only in the checkpoint {tuple(saved[k].shape)}" for k in saved if k not in current]
    out += [f"hyper-network tensor {k}: only in this run {tuple(current[k].shape)}" for k in current if k not in saved]
    out += [f"hyper-network tensor {k}: checkpoint {tuple(saved[k].shape)}, this run {tuple(current[k].shape)}"
            for k in saved if k in current and saved[k].shape != current[k].shape]
    return out


def refuse_old_network(net: dict, path: str | Path) -> None:
    """Refuse hyper-networks of the earlier layout (per-layer input statistics `norms.<layer>`, block
    relu(h A + a) B + b): their tensors mean something else in the current one (editor/hypernet.py)."""
    old = sorted({k.split(".")[1] for k in net if k.split(".")[1:2] in (["norms"], ["down"], ["up"])})
    if old:
        raise ValueError(
            f"editor checkpoint {path} holds a hyper-network of an earlier version of this project ({', '.join(old)}): "
            "input statistics per layer and the block relu(h A + a) B + b. The current network shares one "
            "normaliser per weight shape and uses the authors' block h + s * max(0, h A B + c) + t, so these "
            "weights cannot be reinterpreted; meta-train the editor again")


def refuse_old_inputs(state: dict, path: str | Path) -> None:
    """Refuse a hyper-network trained on other inputs than this code gives it (editor/hypernet.py INPUT_VERSION):
    in networks of input version 1 value gradients shrank as 1/m and the normaliser did not standardise them."""
    version = state.get("input_version", 1)
    if version != INPUT_VERSION:
        raise ValueError(
            f"editor checkpoint {path} holds a hyper-network trained on inputs of version {version}; this code gives "
            f"version {INPUT_VERSION}. Version 1 averaged the edit loss over the whole group (value gradients "
            "shrinking as 1/m) and normalised with std = sqrt(var + 1e-8), which left value gradients of scale 1e-6 "
            "almost unnormalised; the network has learnt those inputs and would be fed others. Meta-train the "
            "editor again")


def check_trained_m(trained: dict | None, m: int, path: str | Path, allow_other_m: bool) -> None:
    """Refuse to evaluate, at m edits, a checkpoint meta-trained at another m, unless `allow_other_m`
    (editor.allow_other_m=true; report.trained_label then labels the results)."""
    if trained and trained["m"] != m and not allow_other_m:
        raise ValueError(
            f"editor checkpoint {path} was meta-trained at m = {trained['m']} edits and this run evaluates m = {m}. "
            "The paper trains one hyper-network per m; to evaluate this one at another m anyway, add "
            "editor.allow_other_m=true (results and tables then say 'trained at m = "
            f"{trained['m']}')")


def as_base(config: dict) -> tuple[dict, str]:
    """`config` with its model's identity (BASE_KEYS) replaced by its base model's when the model was saved by
    mode=edit (a hyper-network trained for the base edits it again), and a note naming both; else as is."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    base = base_model(model)
    if all(base.get(k) == model.get(k) for k in BASE_KEYS):
        return config, ""
    path = model.get("name_or_path")
    edited = bool(path) and (Path(path) / "provenance.json").is_file()  # else only its folder, made absolute
    return {**config, "model": {**model, **base}}, (f" (an edited model, {path}, whose base model is "
                                                    f"{base.get('name_or_path') or base.get('tiny')})" if edited else "")


def load_editor_checkpoint(path: str | Path, editor, config: dict, keys: tuple[str, ...] = LAYOUT_KEYS) -> dict:
    """Load a checkpoint into `editor` after checking it fits this run (`config`, resolved); returns it.
    A model saved by mode=edit is compared by its base model (edit_facts.base_model)."""
    check_checkpoint(path)  # missing, a directory, a JSON or text file: named so
    state = load_checkpoint(path)
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not an editor checkpoint: expected keys {list(REQUIRED)}, found {found}")
    for shape in {k.split(".")[0] for k in state["net"]}:  # tensors renamed since (editor/hypernet.RENAMED)
        rename_old_tensors(state["net"], f"{shape}.")
    refuse_old_network(state["net"], path)
    refuse_old_inputs(state, path)
    (saved, saved_note), (current, note) = as_base(state["config"]), as_base(config)
    diffs = config_differences(saved, current, keys) + net_differences(state["net"], editor.net.state_dict())
    if diffs:
        shapes = {n: weight_shape(m) for n, m in editor.modules.items()}  # (d_out, d_in)
        raise ValueError(
            f"editor checkpoint {path} does not fit this run: it was trained for model {lookup(saved, 'model.name')}"
            f"{saved_note} with modules "
            f"{lookup(saved, 'editor.modules')}; this run uses model {lookup(config, 'model.name')}{note} with "
            f"modules and weight shapes {shapes}. What differs:\n  " + "\n  ".join(diffs))
    editor.load_state_dict(state)
    return state


def resume(path: str | Path, editor, config: dict) -> list[dict]:
    """Restore an interrupted meta-training from its checkpoint: editor, RNG; returns the train log so far."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"editor.resume=true reads {path}, which does not exist: re-run with "
                                "hydra.run.dir=<the interrupted run's directory>")
    state = load_editor_checkpoint(path, editor, config, LAYOUT_KEYS + TRAJECTORY_KEYS)
    if "train_log" not in state or "rng" not in state:
        raise ValueError(f"{path} has no train_log/rng (written before resumption existed): it can be loaded "
                         "with editor.checkpoint=..., but not resumed")
    set_rng_state(state["rng"])
    return list(state["train_log"])


def rng_state() -> dict:
    """Generator states of python, numpy, torch (and CUDA), in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Edit a model with a user's facts, all at once, and save the edited model with its provenance.

pipeline/experiment.py (mode=edit) reads the config, the facts (data/facts.py) and builds the editor; this module
measures ES and GS before and after, applies the shifts, and writes to `out_dir`:
  the model and tokenizer (`save_pretrained`; the FEVER classifier: its encoder, plus the whole
  classifier as classifier.safetensors), and provenance.json (where the edit came from).
The directory is written under a temporary name and renamed, so it is complete or absent.
"""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from data.groups import EditGroup
from editor.base import Editor, apply_shifts
from model.lm import success
from pipeline.preflight import check_out_dir
from util import default_mode, save_json

CLASSIFIER_FILE = "classifier.safetensors"



def fact_metrics(model: nn.Module, group: EditGroup, family: str, device) -> dict[str, float | None]:
    """ES on the facts; GS on every rephrasing (None when no fact has one)."""
    gs = success(model, group.equiv, family, device).mean().item() if group.equiv else None
    return {"ES": success(model, group.edit, family, device).mean().item(), "GS": gs}


def save_model(model: nn.Module, tokenizer, family: str, out_dir: Path) -> None:
    """save_pretrained of model and tokenizer; the classifier saves its encoder and its full state dict."""
    if family == "classifier":  # BertClassifier is ours: encoder by HF, encoder + head as model.checkpoint reads it
        model.bert.save_pretrained(out_dir)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / CLASSIFIER_FILE))
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


BASE_KEYS = ("arch", "name_or_path", "tiny")  # what identifies a model in checkpoint.LAYOUT_KEYS


def base_model(model_cfg: dict) -> dict:
    """{arch, name_or_path, tiny} of the model that `model_cfg` (a resolved config's `model`) was edited
    from: for a model saved by mode=edit, its provenance.json's `base_model`, through any number of
    edits; for any other model, its own."""
    path = model_cfg.get("name_or_path")
    provenance = Path(path) / "provenance.json" if path else None
    if provenance is None or not provenance.is_file():
        base = {k: model_cfg.get(k) for k in BASE_KEYS}
        if path and Path(path).exists():  # a local folder: absolute, so it resolves from anywhere
            base["name_or_path"] = str(Path(path).resolve())
        return base
    saved = json.loads(provenance.read_text())
    return saved.get("base_model") or base_model(saved["config"]["model"])


def reload_overrides(model: str, out_dir: Path, family: str, tiny: bool) -> list[str]:
    """Overrides of `python main.py ...` that load the saved model: its config `model` and its folder."""
    out = [f"model={model}", f"model.name_or_path={out_dir.resolve()}", "model.tokenizer=null"]
    if tiny:
        out.append("model.tiny=null")
    if family == "classifier":
        out.append(f"model.checkpoint={out_dir / CLASSIFIER_FILE}")
    return out


def edit_and_save(model: nn.Module, tokenizer, editor: Editor, group: EditGroup, family: str,
                  device: torch.device, out_dir: Path, provenance: dict) -> dict:
    """Edit all facts of `group` at once, save the edited model to `out_dir`; returns provenance.json's dict."""
    check_out_dir(out_dir)
    before = fact_metrics(model, group, family, device)
    start = time.time()
    shifts = editor.edit_group(group)  # one call: all m facts at once
    edit_time = time.time() - start
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 would make the saved model private
    try:
        # the shifted weights are saved; the model in memory is restored; NonFiniteEdit: nothing is saved
        with apply_shifts(model, shifts, editor.label):
            after = fact_metrics(model, group, family, device)
            save_model(model, tokenizer, family, tmp)
        for path in tmp.rglob("*"):  # safetensors' save_file writes 0600 whatever the umask
            os.chmod(path, default_mode(directory=path.is_dir()))
        record = {**provenance, "n_facts": len(group.records),
                  "n_rephrases": sum(len(r.equiv_prompts) for r in group.records),
                  "edited_parameters": sorted(shifts), "before": before, "after": after, "edit_time_s": edit_time,
                  "diagnostics": editor.diagnostics() or None}  # what bounded the edit (MEMIT, EMMET, LocFT-BF)
        save_json(record, tmp / "provenance.json")
        os.replace(tmp, out_dir)  # POSIX: replaces a missing or empty directory at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record

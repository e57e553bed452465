"""The editor contract: `edit(batches)` returns parameter shifts; `apply_shifts` applies them.

Shifts = {parameter name: delta in the parameter's own layout}. Editors that learn (MALMEN, MEND)
also implement `meta_step(group)`; the others only `edit`.
"""
import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

Shifts = dict[str, torch.Tensor]


def to_param_layout(module: nn.Module, shift: torch.Tensor) -> torch.Tensor:
    """A (d_out, d_in) shift in the layout of the module's weight (Conv1D stores W transposed)."""
    return shift.T if isinstance(module, Conv1D) else shift


def from_param_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor (e.g. a gradient) as (d_out, d_in)."""
    return tensor.T if isinstance(module, Conv1D) else tensor


class NonFiniteEdit(ValueError):
    """Edited weights with inf or NaN in the model's dtype: never applied, reported or saved."""

    def __init__(self, editor: str, name: str, dtype: torch.dtype, delta: torch.Tensor, out: torch.Tensor):
        bad = int((~torch.isfinite(out)).sum())
        cause = ("the shift itself is not finite (the editor diverged)" if not torch.isfinite(delta).all() else
                 f"W + shift overflows {dtype} (largest |shift| {delta.abs().max().item():.3g}; largest finite "
                 f"{dtype} value {torch.finfo(dtype).max:.3g})")
        super().__init__(f"editor {editor}: the edited parameter {name} has {bad} of {out.numel()} values that are "
                         f"not finite in the model's dtype {dtype}: {cause}. The edit is not applied, reported or "
                         "saved; use a smaller step (editor.lr, editor.lr_init) or a wider model.dtype (float32)")


def shifted(param: torch.Tensor, delta: torch.Tensor, name: str = "?", editor: str = "?") -> torch.Tensor:
    """W + delta, added in the shift's precision and cast back to W's dtype (bf16 models); NonFiniteEdit
    if the result, after that cast (where fp16 and bf16 overflow), holds inf or NaN. Every editor's
    edit reaches the model through here, in training, validation and mode=edit."""
    out = (param.to(delta.dtype) + delta.to(param.device)).to(param.dtype)
    if not torch.isfinite(out).all():
        raise NonFiniteEdit(editor, name, param.dtype, delta, out)
    return out


@contextmanager
def apply_shifts(model: nn.Module, shifts: Shifts, editor: str = "?"):
    """Apply shifts in place; on exit put the original tensors back, bit for bit (no subtraction).
    `editor` names the editor in the NonFiniteEdit message."""
    saved = {}
    try:
        for name, delta in shifts.items():
            param = model.get_parameter(name)
            saved[name] = param.data
            param.data = shifted(param.data, delta, name, editor)
        yield model
    finally:
        for name, original in saved.items():
            model.get_parameter(name).data = original


def finite(x: float) -> float | None:
    """x, or None when it is not finite: a diagnostic is never reported as a number it is not."""
    return x if math.isfinite(x) else None


def mean(t: torch.Tensor) -> float | None:
    return finite(float(t.double().mean()))


def maximum(t: torch.Tensor) -> float | None:
    return finite(float(t.double().max()))


def frac(mask: torch.Tensor) -> float:
    return float(mask.double().mean())


class Editor:
    """Base class: an editor is built from a model and its hyper-parameters."""

    name = "editor"  # the config's editor name (editor=...)
    trainable = False  # True for editors with meta-training (MALMEN, MEND)
    step = 0  # meta-training steps taken
    stats_time_s = 0.0  # seconds spent computing precomputed statistics (MEMIT, EMMET); 0 when cached
    prefix = None  # model/prefix.PrefixStates of the run (MALMEN, MEND: trace and meta losses), or None
    timer = None  # name -> context manager that times a named phase (scripts/benchmark.py), or None

    def __init__(self, model: nn.Module, family: str, device: str | torch.device = "cpu"):
        self.model, self.family, self.device = model, family, torch.device(device)
        self.label = self.name  # how messages name it; MEND run as editor=malmen ablation=sum says so

    def phase(self, name: str):
        """The context a named phase of the method runs in ("trace", "hyper-network", "solve", "stage 1",
        "stage 2", "edited forward", "KL reference"): timed when `timer` is set, else nothing."""
        return self.timer(name) if self.timer is not None else nullcontext()

    def edit(self, batches: list[dict]) -> Shifts:
        """Parameter shifts that insert the edit tuples of `batches`."""
        raise NotImplementedError

    def edit_group(self, group) -> Shifts:
        """Shifts for an EditGroup; editors that need the records themselves (MEMIT's subjects) override it."""
        return self.edit(group.edit)

    def edited_modules(self) -> list[str]:
        """Names of the modules this editor changes: nothing below the lowest of them changes."""
        raise NotImplementedError

    def diagnostics(self) -> dict:
        """What the last edit did, for results.json's validation rows (e.g. MEMIT's targets, LocFT-BF's
        epochs); JSON-ready, {} when there is nothing to say."""
        return {}

    def meta_step(self, group) -> dict[str, float]:
        """One meta-training step on an EditGroup; returns scalar metrics."""
        raise NotImplementedError(f"{type(self).__name__} has no meta-training")

    def state_dict(self) -> dict:
        """Everything needed to resume (empty for editors without learned state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""

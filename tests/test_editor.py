"""The normal-equation solve, shift application, and editing behaviour of each editor."""
import math

import pytest
import torch

from editor.base import apply_shifts
from model.trace import weight_shape
from pipeline.experiment import build_editor
from tests.helpers import build_model, make_cfg, one_group, qa_records


def float64_editor():
    """A float64 MALMEN editor on tiny GPT-2 (rank 16, hyper-network batch 7), its first module and its network."""
    cfg = make_cfg("model=tiny-gpt2", "editor=malmen", "editor.rank=16", "editor.batch_size=7")
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    editor = build_editor(cfg, model, dtype=torch.float64)
    name = next(iter(editor.modules))
    return editor, name, *editor.network(name)


@pytest.mark.parametrize("n_tokens", [40, 300])  # fewer and more cached tokens than d_in = 128
def test_normal_equation_matches_ridge_least_squares(n_tokens):
    editor, name, net, layer = float64_editor()
    with torch.no_grad():
        net.lr.fill_(0.1)
        net.log_lambda.fill_(math.log(0.3))
        net.B.normal_(0, 0.1)  # away from the identity initialisation
        net.c.normal_(0, 0.1)
    keys = torch.randn(n_tokens, net.d_in, dtype=torch.float64)
    grads = torch.randn(n_tokens, weight_shape(editor.modules[name])[0], dtype=torch.float64)
    with torch.no_grad():
        shift = editor.shifts({name: (keys, grads)})[name]  # (d_out, d_in)
        diffs = net.value_diffs(keys, grads, layer)  # (n, d_out)
    # min_S ||S U - D||^2 + lam ||S||^2 as ordinary least squares on the augmented system
    # [U^T; sqrt(lam) I] S^T = [D^T; 0]; solved by QR in lstsq, independently of the normal equation.
    lam = 0.3
    a = torch.cat([keys, math.sqrt(lam) * torch.eye(net.d_in, dtype=torch.float64)])
    b = torch.cat([diffs, torch.zeros(net.d_in, diffs.shape[1], dtype=torch.float64)])
    ref = torch.linalg.lstsq(a, b).solution.T
    assert shift.shape == ref.shape
    assert torch.allclose(shift, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-gptj"])  # float32 Conv1D, bfloat16 Linear
def test_apply_and_restore_is_bit_identical(model_name):
    cfg = make_cfg(f"model={model_name}")
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [f"{m}.weight" for m in cfg.model.edit_modules]
    shifts = {n: 1e-3 * torch.randn(model.get_parameter(n).shape) for n in names}
    with apply_shifts(model, shifts):
        for n in names:
            assert not torch.equal(model.get_parameter(n), before[n])
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype
        assert torch.equal(p, before[n]), n  # bit for bit, also in bfloat16


def test_apply_restores_after_an_exception():
    cfg = make_cfg("model=tiny-gpt2")
    model, _ = build_model(cfg)
    name = f"{cfg.model.edit_modules[0]}.weight"
    before = model.get_parameter(name).detach().clone()
    with pytest.raises(RuntimeError):
        with apply_shifts(model, {name: torch.ones_like(before)}):
            raise RuntimeError("interrupted")
    assert torch.equal(model.get_parameter(name), before)


@pytest.mark.parametrize("editor_name", ["ft", "malmen", "mend"])
def test_edit_changes_only_the_configured_modules(editor_name):
    cfg = make_cfg("model=tiny-gpt2", f"editor={editor_name}", "data.n_edits=4", "data.batch_size=2",
                   "editor.n_epochs=1" if editor_name == "ft" else "editor.rank=16")
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    editor = build_editor(cfg, model)
    group = one_group(cfg, tokenizer, qa_records(4))
    shifts = editor.edit(group.edit)
    expected = {f"{m}.{p}" for m in cfg.editor.modules for p, _ in model.get_submodule(m).named_parameters()}
    if editor_name != "ft":
        expected = {f"{m}.weight" for m in cfg.editor.modules}
    assert set(shifts) == expected
    for n, s in shifts.items():
        assert s.shape == model.get_parameter(n).shape
        assert torch.isfinite(s).all() and s.abs().max() > 0, n


@pytest.mark.parametrize("n_tokens", [40, 300])  # fewer and more cached tokens than d_in = 128
def test_primal_and_dual_normal_equations_agree(n_tokens):
    """S*, dL/dD and <M, S*> from K^T K + lambda I (d_in, d_in) and from K K^T + lambda I (n, n)
    (editor/normal_equation.py) agree, and match M = G (K^T K + lambda I)^-1 written out with an
    explicit inverse."""
    editor, name, net, layer = float64_editor()
    with torch.no_grad():
        net.log_lambda.fill_(math.log(0.3))
        net.B.normal_(0, 0.1)
    keys = torch.randn(n_tokens, net.d_in, dtype=torch.float64)
    grads = torch.randn(n_tokens, weight_shape(editor.modules[name])[0], dtype=torch.float64)
    grad_w = torch.randn(grads.shape[1], net.d_in, dtype=torch.float64)  # G = dL/dS*
    with torch.no_grad():
        diffs = net.value_diffs(keys, grads, layer)
        inv = torch.linalg.inv(keys.T @ keys + 0.3 * torch.eye(net.d_in, dtype=torch.float64))
        ref_shift = diffs.T @ keys @ inv
        ref_m = grad_w @ inv
        for form in ("primal", "dual"):
            system = editor.layers({name: (keys, grads)}, form=form)[name].system
            shift = system.shift(diffs)
            grad_d, inner = system.pull_back(grad_w, shift)
            assert torch.allclose(shift, ref_shift, rtol=1e-9, atol=1e-11), form
            assert torch.allclose(grad_d, keys @ ref_m.T, rtol=1e-9, atol=1e-11), form
            assert torch.allclose(inner, (ref_m * ref_shift).sum(), rtol=1e-9), form

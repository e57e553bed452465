"""The two-stage meta-gradient (Alg. 2) equals autograd through the unrolled pipeline (Fig. 1).

Everything runs in float64 on tiny random models. The hyper-network is perturbed away from its
identity initialisation (where most of its gradients would be exactly zero) so that every parameter,
the learning rates eta and the regulariser lambda all carry a non-trivial gradient.
"""
import math

import pytest
import torch

from editor.malmen import REDUCTIONS
from pipeline.experiment import build_editor
from tests.helpers import float64_setup, grads, max_rel_err

CASES = [("tiny-gpt2", "zsre"), ("tiny-t5", "zsre"), ("tiny-bert", "fever"), ("tiny-llama", "zsre")]
TOL = 1e-6


def two_stage_and_reference(editor, group, make_twin):
    """Gradients of the two-stage procedure and of end-to-end autograd from identical editors."""
    twin = make_twin()
    twin.load_state_dict(editor.state_dict())
    editor.meta_grad(group)
    twin.meta_grad_end_to_end(group)
    return grads(editor), grads(twin)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("editor_name", ["malmen", "mend"])
@pytest.mark.parametrize("model_name,data", CASES)
def test_two_stage_equals_end_to_end(model_name, data, editor_name, reduction):
    cfg, model, editor, group = float64_setup(model_name, data, editor_name, m=6, lm_batch=4, editor_batch=5,
                                              reduction=reduction)
    got, ref = two_stage_and_reference(editor, group, lambda: build_editor(cfg, model, dtype=torch.float64))
    if editor_name == "malmen":
        assert any(n.endswith("log_lambda") for n in ref), "d L_meta / d lambda must be checked"
    err = max_rel_err(got, ref)
    print(f"{model_name} {editor_name}: max relative error {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("editor_name", ["malmen", "mend"])
def test_gradient_does_not_depend_on_batch_sizes(editor_name, reduction):
    m = 7
    cfg, model, editor, group = float64_setup("tiny-gpt2", "zsre", editor_name, m, lm_batch=m,
                                              editor_batch=10_000, reduction=reduction)
    _, ref = two_stage_and_reference(editor, group, lambda: build_editor(cfg, model, dtype=torch.float64))
    # (LM batch, hyper-network batch): one tuple at a time, sizes that do not divide m, one batch.
    for lm_batch, editor_batch in [(1, 1), (3, 4), (2, 5), (m, 10_000)]:
        cfg2, model2, editor2, group2 = float64_setup("tiny-gpt2", "zsre", editor_name, m, lm_batch, editor_batch,
                                                      reduction)
        assert len(group2.equiv) == math.ceil(m / lm_batch)
        editor2.meta_grad(group2)
        err = max_rel_err(grads(editor2), ref)
        print(f"{editor_name} lm_batch={lm_batch} editor_batch={editor_batch}: {err:.2e}")
        assert err <= TOL

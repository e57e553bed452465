"""The lower blocks run once per tuple (model/prefix.py): with prefix states and without, the same
meta-gradients (two-stage and end-to-end), shifts and ES/GS/LS, in float64 on every family to 1e-10; and on
the real SmolLM2 in float32. A family that cannot start from a hidden state runs whole and says why."""
import pytest
import torch

from model.prefix import PrefixStates
from pipeline.experiment import build_editor, evaluate, load
from tests.helpers import make_cfg, max_rel_err, meta_grads, one_group, records_for, twins

CASES = [("tiny-gpt2", "zsre"), ("tiny-gptj", "zsre"), ("tiny-llama", "zsre"), ("tiny-t5", "zsre")]
TOL = 1e-10


@pytest.mark.parametrize("end_to_end", [False, True])
@pytest.mark.parametrize("editor_name", ["malmen", "mend"])
@pytest.mark.parametrize("model_name,data", CASES)
def test_prefix_states_change_no_gradient_shift_or_metric(model_name, data, editor_name, end_to_end):
    cfg, model, plain, prefixed, group = twins(model_name, data, editor_name)
    state = {k: v.clone() for k, v in prefixed.net.state_dict().items()}  # the normaliser moves with each step
    first = meta_grads(prefixed, group, end_to_end)  # holds the states (trace, equivalent, unrelated tuples)
    prefixed.net.load_state_dict(state)
    again = meta_grads(prefixed, group, end_to_end)  # from the held states
    ref = meta_grads(plain, group, end_to_end)
    assert max_rel_err(first, ref) <= TOL and max_rel_err(again, ref) <= TOL
    summary = prefixed.prefix.summary()
    if model_name == "tiny-t5":  # runs whole, and says why
        assert summary["off"].startswith("T5's relative position bias") and summary["hits"] == summary["bytes"] == 0
        return
    n = sum(len(b["input_ids"]) for b in (*group.edit, *group.equiv, *group.unrel))
    assert summary["off"] is None and summary["first_block"] == 2 and summary["tuples"] == 3 * 6
    # first pass: every tuple missed once, the unrelated ones hit for the edited model after the KL reference;
    # second pass: all four forward passes hit
    assert summary["misses"] == n and summary["hits"] == 6 + (n + 6)
    for name, shift in plain.edit(group.edit).items():
        torch.testing.assert_close(prefixed.edit(group.edit)[name], shift, rtol=TOL, atol=TOL * shift.abs().max())
    with_prefix = evaluate(model, group, cfg.model.family, "cpu", prefixed.prefix, generate=True)[0]
    assert with_prefix == evaluate(model, group, cfg.model.family, "cpu", generate=True)[0]  # generated scores too
    before = with_prefix["unrel_greedy"]  # "unchanged": one teacher-forced pass, from the held states
    assert evaluate(model, group, cfg.model.family, "cpu", prefixed.prefix, generate=True, before=before)[0] == \
        evaluate(model, group, cfg.model.family, "cpu", generate=True, before=before)[0]


def test_prefix_states_hold_no_more_than_their_limit():
    cfg, model, plain, prefixed, group = twins("tiny-gpt2", "zsre", "malmen")
    one = group.edit[0]["input_ids"].shape[1] * model.config.n_embd * 8  # bytes of about one float64 tuple
    prefixed.prefix = PrefixStates(model, prefixed.edited_modules(), max_gb=2.5 * one / 2 ** 30)
    for _ in range(2):
        prefixed.meta_grad(group)
    summary = prefixed.prefix.summary()
    assert 1 <= summary["tuples"] <= 2 and summary["bytes"] <= 2.5 * one and summary["hits"] == 0
    assert summary["not_kept"] >= 3 * 6 - summary["tuples"] and summary["off"] is None  # counted per pass
    assert PrefixStates(model, prefixed.edited_modules(), max_gb=0).summary()["off"] == "prefix_cache_gb=0"
    assert PrefixStates(model, ["lm_head"]).summary()["off"].startswith("an edited module lies in the first block or")


def test_smollm2_gives_the_same_losses_and_metrics_from_prefix_states(smollm2):  # noqa: F811
    """Float32, the real model: one meta-step's losses to 1e-5 relative, and the same ES/GS/LS."""
    cfg = make_cfg("model=smollm2", f"cache_dir={smollm2.cache_dir}", "data.n_edits=8", "data.batch_size=4",
                   "editor.rank=8")
    cfg.model.name_or_path = smollm2.model.name_or_path
    model, tokenizer = load(cfg)
    group = one_group(cfg, tokenizer, records_for("causal", 8))
    plain, prefixed = build_editor(cfg, model), build_editor(cfg, model)
    prefixed.load_state_dict(plain.state_dict())
    prefixed.prefix = PrefixStates(model, prefixed.edited_modules())
    assert prefixed.prefix.first == 24 and prefixed.prefix.reason is None
    state = {k: v.clone() for k, v in prefixed.net.state_dict().items()}
    prefixed.meta_grad(group)  # holds the states
    prefixed.net.load_state_dict(state)
    got, ref = prefixed.meta_grad(group), plain.meta_grad(group)
    assert prefixed.prefix.hits > 0 and got == pytest.approx(ref, rel=1e-5)
    assert evaluate(model, group, "causal", "cpu", prefixed.prefix, generate=True)[0] == evaluate(
        model, group, "causal", "cpu", generate=True)[0]

"""MEMIT, EMMET and LocFT-BF as their authors ran them, each rule against a computation written
here from the model's plain forward pass (full logits, hooks, positions counted by hand), on tiny models
in float64 where the rule is a closed form: EMMET's single layer, the solve's diagnostics, the statistics'
source, LocFT-BF's loss. MEMIT's target vectors (contexts, keys, target loss, early stop) and its defaults:
tests/test_memit_targets.py.

The world is tests/test_located.py's (the `world` fixture, tests/helpers.py): word-level tokens, so the subject
of "The home town of {s}" is the LAST token of every context and the FIRST of "{s} is a", positions this file
counts without the editor.
"""
import pytest
import torch
import torch.nn.functional as F

from data.collate import IGNORE
from data.records import EditRecord
from editor.base import apply_shifts, from_param_layout
from editor.locft_bf import LocFTBF, concat, with_eos
from pipeline.experiment import build_editor, stats_texts
from pipeline.report import diagnostics_lines
from tests.helpers import F64, build_model, edited, last_token_state, make_cfg, one_group, world_cfg


# ----- EMMET: its own single layer -------------------------------------------------------------------------------
@pytest.mark.parametrize("model,layers,lam", [("gpt-j", [5], 1), ("gpt2", [4], 500), ("smollm2", [5], 0.1),
                                              ("tiny-gpt2", [1], 20)])
def test_emmet_reads_its_own_per_model_setting(model, layers, lam):
    cfg = make_cfg(f"model={model}", "editor=emmet")
    assert (list(cfg.editor.layers), cfg.editor.lam, cfg.editor.lam_e) == (layers, lam, 0.1)
    assert cfg.editor.module == cfg.model.memit.module and cfg.editor.n_steps == 25


@pytest.mark.parametrize("editor_name", ["memit", "emmet"])
def test_a_layer_the_model_lacks_is_named_by_the_key_the_user_set(world, tmp_path, editor_name):
    cfg = world_cfg(world, tmp_path, editor_name, "editor.layers=[1,99]")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    with pytest.raises(ValueError) as err:
        build_editor(cfg, model, tokenizer=tok)
    msg = str(err.value)  # the key, the missing module, and the modules there are (layers 0-3 of tiny-gpt2)
    assert msg.startswith("cannot resolve editor.layers=[1, 99] in editor.module='transformer.h.{}.mlp.c_proj': "
                          "transformer.h.99.mlp.c_proj (no such module)") and "transformer.h.{0-3}.mlp.c_proj" in msg


def test_emmet_puts_the_whole_residual_on_its_one_layer(world, tmp_path):
    cfg = world_cfg(world, tmp_path, "emmet", "editor.n_steps=3", *F64)
    editor, group, model, shifts = edited(cfg)
    (name,) = editor.solves
    assert name == cfg.editor.module.format(1) and set(shifts) == {f"{name}.weight"}
    k, r, _ = editor.solves[name]
    for i, rec in enumerate(group.records):  # z - h, not divided: no layer after it shares it
        h = last_token_state(model, editor.block, editor.tokenizer, rec.prompt, output=True)
        assert torch.allclose(r[:, i], editor.z[i] - h, rtol=1e-10, atol=1e-12)
    delta = shifts[f"{name}.weight"].T  # Conv1D layout -> (d_out, d_in)
    # equality constraints up to the stabiliser lam * lam_e = 2 against k^T C^-1 k ~ d_in = 128 (0.6% here)
    assert (delta @ k - r).norm() < 0.02 * r.norm()


@pytest.mark.parametrize("editor_name", ["memit", "emmet"])
def test_solve_diagnostics_against_the_edited_models_forward_pass(world, tmp_path, editor_name):
    """`solve` in diagnostics: each layer's |Delta k - r| / |r| on the solve's own K, R and the applied shift, and
    z_gap = |z - h'| / |z - h| with h, h' the output of block L at the bare prompt, run alone, before and after."""
    cfg = world_cfg(world, tmp_path, editor_name, "editor.n_prefixes=2", "editor.n_steps=3", *F64)
    editor, group, model, shifts = edited(cfg)
    solve = editor.diagnostics()["solve"]
    assert solve["moved"] == len(group.records) and list(solve["residual"]) == list(editor.solves)  # in layer order
    for name, (k, r, _) in editor.solves.items():
        delta = from_param_layout(editor.modules[name], shifts[f"{name}.weight"])  # (d_out, d_in)
        want = ((delta @ k - r).norm(dim=0) / r.norm(dim=0)).mean()
        assert solve["residual"][name] == pytest.approx(float(want), rel=1e-9)
    tok = editor.tokenizer
    before = torch.stack([last_token_state(model, editor.block, tok, r.prompt, output=True) for r in group.records])
    with apply_shifts(model, shifts):
        after = torch.stack([last_token_state(model, editor.block, tok, r.prompt, output=True)
                             for r in group.records])
    gap = (editor.z - after).norm(dim=1) / (editor.z - before).norm(dim=1)
    assert solve["z_gap_mean"] == pytest.approx(float(gap.mean()), rel=1e-9)
    assert solve["z_gap_max"] == pytest.approx(float(gap.max()), rel=1e-9)
    assert 0 < solve["z_gap_mean"] < 1  # the edit moved h towards z, not onto it


def test_results_md_weighs_the_groups_z_gap_by_the_edits_that_moved():
    targets = dict(converged=0.5, at_clamp=0.0, steps=3.0, nll_mean=0.1, nll_max=0.2)
    rows = [{"targets": {**targets, "n": 2}, "solve": {"moved": 1, "residual": {"a": 0.9, "b": 0.01},
                                                        "z_gap_mean": 0.2, "z_gap_max": 0.3}},
            {"targets": {**targets, "n": 3}, "solve": {"moved": 3, "residual": {"a": 0.9, "b": 0.04},
                                                        "z_gap_mean": 0.6, "z_gap_max": 0.7}}]
    line = diagnostics_lines(rows, {})[1]  # (0.2 * 1 + 0.6 * 3) / 4 = 0.5; the last layer "b", largest 0.04
    assert "(4 edits that asked for a change; 1 whose z was already h left out)" in line
    assert "is 50.0% of what it was on average (worst 70.0%)" in line and "by 4.0% (mean over edits" in line
    rows[1]["solve"]["z_gap_mean"] = None  # not finite in one group: never averaged into a number
    assert "is n/a (not finite) of what" in diagnostics_lines(rows, {})[1]
    rows = [{"targets": {**targets, "n": 2}, "solve": {"moved": 0}}]
    assert "no edit asked for a change" in diagnostics_lines(rows, {})[1]


def test_requests_already_at_their_target_are_left_out_of_the_ratios(world, tmp_path):
    """stop_loss above every loss: no step, z = h for every request; the ratios would be 0 / 0."""
    cfg = world_cfg(world, tmp_path, "memit", "editor.n_prefixes=2", "editor.stop_loss=1e9", *F64)
    editor, *_ = edited(cfg)
    assert editor.diagnostics()["solve"] == {"moved": 0}


# ----- statistics: wikitext by default for real models, never silently -------------------------------------------
@pytest.mark.parametrize("model,source", [("gpt2", "wikitext"), ("gpt-j", "wikitext"), ("smollm2", "wikitext"),
                                          ("llama-3-8b", "wikitext"), ("tiny-gpt2", "train"), ("toy-gpt2", "train"),
                                          ("tiny-llama", "train")])
def test_statistics_default_per_model(model, source):
    assert make_cfg(f"model={model}", "editor=memit").editor.stats_source == source


def test_wikitext_unavailable_stops_naming_the_override(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = make_cfg("model=smollm2", "editor=emmet")
    with pytest.raises(ValueError, match="model smollm2 come from wikitext-103.*ConnectionError.*run with "
                                         "editor.stats_source=train"):
        stats_texts(cfg)


# ----- LocFT-BF: per-example mean, epoch loss weighted by batch size ---------------------------------------------
def locft_batch(world, tmp_path):
    recs = [EditRecord(prompt=f"The home town of {s}", answer=" ".join(["Paris", "Rome", "Oslo"][: 1 + i % 3]),
                       equiv_prompts=("x",), unrel_prompt="x", unrel_answer="Lima", subject=s, index=i)
            for i, s in enumerate(["Alma", "Boris", "Cyra", "Dov", "Enzo"])]  # answers of 1, 2, 3, 1, 2 tokens
    cfg = world_cfg(world, tmp_path, "locft_bf", "data.n_edits=5", "data.batch_size=5", *F64)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    return cfg, model, tok, concat(one_group(cfg, tok, recs).edit)  # all 5 (batches are cut by length)


def per_example_means(model, batch) -> torch.Tensor:
    """Each example's mean NLL over its target tokens, from the full logits (B,)."""
    with torch.no_grad():
        lg = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for row, labels in zip(lg, batch["labels"]):
        keep = labels != IGNORE
        out.append(F.cross_entropy(row[keep], labels[keep]))
    return torch.stack(out)


def test_locft_loss_is_the_mean_of_per_example_means(world, tmp_path):
    cfg, model, tok, batch = locft_batch(world, tmp_path)
    data = with_eos(batch, tok.eos_token_id)
    editor = LocFTBF(model, "causal", cfg.editor.module, lr=0.0, batch_size=5, n_epochs=1, loss_threshold=0.0,
                     eos_id=tok.eos_token_id, seed=0)
    param = model.get_parameter(editor.param)
    got = editor.loss(data, {editor.param: param})
    means = per_example_means(model, data)
    assert torch.allclose(got, means.mean(), rtol=1e-12)
    counts = (data["labels"] != IGNORE).sum(1).double()  # 2 to 4 targets each (answer + EOS)
    assert abs(got - (means * counts).sum() / counts.sum()) > 1e-6 * got  # not the token mean (1e-4 here)


def test_locft_epoch_loss_is_weighted_by_batch_size(world, tmp_path):
    """lr 0: the weights never move, so an epoch's loss is the mean over ALL examples of their per-example
    means whatever the shuffle; batches of 2, 2, 1 make it differ from the plain mean of batch losses."""
    cfg, model, tok, batch = locft_batch(world, tmp_path)
    want = float(per_example_means(model, with_eos(batch, tok.eos_token_id)).mean())

    def run(threshold: float) -> LocFTBF:
        ed = LocFTBF(model, "causal", cfg.editor.module, lr=0.0, batch_size=2, n_epochs=3, loss_threshold=threshold,
                     eos_id=tok.eos_token_id, seed=0)
        ed.edit([batch])
        return ed
    ed = run(want * (1 - 1e-9))
    assert ed.epochs_run == 3 and all(abs(v - want) < 1e-9 * want for v in ed.epoch_losses)
    every = run(0.0).diagnostics()  # no batch loss under 0: 3 epochs of batches 2, 2, 1 take 9 steps
    assert every == {"epochs": 3, "steps": 9, "stopped_early": False, "epoch_losses": every["epoch_losses"]}
    assert run(want * (1 + 1e-9)).diagnostics()["stopped_early"]
    assert run(want * (1 + 1e-9)).epochs_run == 1  # stops after the first epoch, by the weighted mean
